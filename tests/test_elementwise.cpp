// Elementwise ops: CPU values vs plain loops for every broadcast form, finite-difference checks of
// binary_backward, and CUDA vs CPU for every op, broadcast form and dtype pair.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "ops/elementwise.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

const BinaryOp kOps[] = {BinaryOp::add, BinaryOp::sub, BinaryOp::mul, BinaryOp::div};

float ref_apply(BinaryOp op, float x, float y) {
  switch (op) {
    case BinaryOp::add: return x + y;
    case BinaryOp::sub: return x - y;
    case BinaryOp::mul: return x * y;
    case BinaryOp::div: return x / y;
  }
  return 0;
}

// The b shapes of every broadcast form for a of shape (2, 3, 5) (R = 6, C = 5).
struct Form {
  const char* name;
  Shape b_shape;
  Broadcast bc;
};
const Form kForms[] = {
    {"same", {2, 3, 5}, Broadcast::same},  {"row [C]", {5}, Broadcast::row},
    {"row [1,C]", {1, 5}, Broadcast::row}, {"col [..,1]", {2, 3, 1}, Broadcast::col},
    {"col [R,1]", {6, 1}, Broadcast::col}, {"scalar", {1}, Broadcast::scalar},
};

// Element (r, c) of b under broadcast bc.
float b_at(const std::vector<float>& b, Broadcast bc, int64_t r, int64_t c, int64_t C) {
  switch (bc) {
    case Broadcast::same: return b[r * C + c];
    case Broadcast::row: return b[c];
    case Broadcast::col: return b[r];
    case Broadcast::scalar: return b[0];
  }
  return 0;
}

// b in [0.5, 1.5] so div stays well conditioned; a in [-1, 1].
Tensor make_b(const Shape& s, uint64_t seed, DType dt = DType::f32, Device dev = Device::cpu()) {
  return Tensor::uniform(s, 0.5f, 1.5f, seed, dt, dev);
}

double weighted_sum(const Tensor& y, const std::vector<float>& w) {
  std::vector<float> v = y.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += static_cast<double>(v[i]) * w[i];
  return s;
}

// Same-shape add/sub: db = ±dy exactly, kept in b's dtype when that is dy's (no f32 round trip);
// f32 otherwise (a bf16 b of an f32 dy would round), and always f32 for mul/div and the reductions.
void check_same_shape_grads(Device dev) {
  const DType dts[] = {DType::f32, DType::bf16};
  for (DType adt : dts) {
    for (DType bdt : dts) {
      Tensor a = Tensor::uniform({5, 12}, -1, 1, 61, adt, dev), b = make_b({5, 12}, 62, bdt, dev);
      Tensor dy = Tensor::uniform({5, 12}, -1, 1, 63, adt, dev);
      std::vector<float> vdy = dy.to_f32_vector();
      for (BinaryOp op : kOps) {
        const std::string what = std::string(binary_op_name(op)) + " " + dtype_name(adt) + "/" + dtype_name(bdt);
        BinaryGrads g = binary_backward(op, dy, a, b, true, true);
        const bool additive = op == BinaryOp::add || op == BinaryOp::sub;
        EXPECT_EQ(g.da.dtype(), adt) << what;
        EXPECT_EQ(g.db.dtype(), additive && bdt == adt ? bdt : DType::f32) << what;
        EXPECT_EQ(g.db.device(), dev) << what;
        if (!additive) continue;
        EXPECT_FALSE(g.da.shares_storage_with(dy) || g.db.shares_storage_with(dy))
            << what << ": the op returns fresh gradients";
        std::vector<float> da = g.da.to_f32_vector(), db = g.db.to_f32_vector();
        for (size_t i = 0; i < vdy.size(); ++i) {
          ASSERT_EQ(da[i], vdy[i]) << what << " da " << i;
          ASSERT_EQ(db[i], op == BinaryOp::sub ? -vdy[i] : vdy[i]) << what << " db " << i;
        }
      }
    }
  }
}

}  // namespace

TEST(Elementwise, BinaryMatchesLoopsForEveryBroadcastForm) {
  Tensor a = Tensor::uniform({2, 3, 5}, -1, 1, 1);
  std::vector<float> va = a.to_f32_vector();
  for (const Form& f : kForms) {
    Tensor b = make_b(f.b_shape, 2);
    ASSERT_EQ(binary_broadcast(a, b, "test"), f.bc) << f.name;
    std::vector<float> vb = b.to_f32_vector();
    for (BinaryOp op : kOps) {
      Tensor y = binary(op, a, b);
      ASSERT_EQ(y.shape(), a.shape());
      std::vector<float> ref(va.size());
      for (int64_t r = 0; r < 6; ++r)
        for (int64_t c = 0; c < 5; ++c) ref[r * 5 + c] = ref_apply(op, va[r * 5 + c], b_at(vb, f.bc, r, c, 5));
      EXPECT_TRUE(all_close(y.to_f32_vector(), ref, 0, 0)) << f.name << " " << binary_op_name(op);
    }
  }
  // The convenience wrappers are the same ops.
  Tensor b = make_b({5}, 3);
  EXPECT_TRUE(all_close(add(a, b), binary(BinaryOp::add, a, b), 0, 0));
  EXPECT_TRUE(all_close(sub(a, b), binary(BinaryOp::sub, a, b), 0, 0));
  EXPECT_TRUE(all_close(mul(a, b), binary(BinaryOp::mul, a, b), 0, 0));
  EXPECT_TRUE(all_close(div(a, b), binary(BinaryOp::div, a, b), 0, 0));
}

TEST(Elementwise, MixedDtypesGiveADtype) {
  // bf16 matrix times an f32 per-channel vector: fp32 math, one rounding to bf16 at the end.
  Tensor a = Tensor::uniform({4, 8}, -2, 2, 5, DType::bf16);
  Tensor s = Tensor::uniform({8}, 0.5f, 2.0f, 6);
  Tensor y = mul(a, s);
  EXPECT_EQ(y.dtype(), DType::bf16);
  std::vector<float> va = a.to_f32_vector(), vs = s.to_f32_vector(), vy = y.to_f32_vector();
  for (int64_t i = 0; i < 32; ++i) EXPECT_EQ(vy[i], round_bf16(va[i] * vs[i % 8])) << i;
}

TEST(Elementwise, BadBroadcastShapesThrow) {
  Tensor a = Tensor::uniform({2, 3, 5}, -1, 1, 1);
  EXPECT_THROW(add(a, Tensor::zeros({4}, DType::f32)), Error);        // row of the wrong length
  EXPECT_THROW(add(a, Tensor::zeros({3, 1}, DType::f32)), Error);     // column of 3, R is 6
  EXPECT_THROW(add(a, Tensor::zeros({2, 1, 5}, DType::f32)), Error);  // not one of the forms
  EXPECT_THROW(add(a, Tensor::zeros({2, 3}, DType::f32)), Error);
  EXPECT_THROW(add(a, Tensor::zeros({6}, DType::i32)), Error);  // not a float
  Tensor acc = Tensor::zeros({2, 3, 5}, DType::f32);
  EXPECT_THROW(add_inplace(acc, Tensor::zeros({5}, DType::f32)), Error);  // add_inplace needs the same shape
  try {
    add(a, Tensor::zeros({4}, DType::f32));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[2, 3, 5]"), std::string::npos) << e.what();
  }
}

TEST(Elementwise, ScaleAndAddInplace) {
  Tensor a = Tensor::uniform({3, 7}, -1, 1, 7);
  std::vector<float> va = a.to_f32_vector();
  Tensor y = scale(a, -2.5f);
  std::vector<float> vy = y.to_f32_vector();
  for (size_t i = 0; i < va.size(); ++i) EXPECT_EQ(vy[i], va[i] * -2.5f);
  // f32 accumulator += alpha * bf16 gradient.
  Tensor acc = a.clone();
  Tensor g = Tensor::uniform({3, 7}, -1, 1, 8, DType::bf16);
  std::vector<float> vg = g.to_f32_vector();
  add_inplace(acc, g, 0.5f);
  EXPECT_EQ(acc.dtype(), DType::f32);
  std::vector<float> vacc = acc.to_f32_vector();
  for (size_t i = 0; i < va.size(); ++i) EXPECT_EQ(vacc[i], va[i] + 0.5f * vg[i]);
  // In place really means in place: a view of a bigger tensor is updated inside it.
  Tensor big = Tensor::zeros({4, 7}, DType::f32);
  Tensor view = big.view_rows(1, 3);
  add_inplace(view, a);
  EXPECT_TRUE(all_close(big.view_rows(1, 3), a, 0, 0));
  EXPECT_EQ(big.to_f32_vector()[0], 0.0f);
}

TEST(Elementwise, BinaryBackwardMatchesFiniteDifferences) {
  for (const Form& f : kForms) {
    for (BinaryOp op : kOps) {
      Tensor a = Tensor::uniform({2, 3, 5}, -1, 1, 11);
      Tensor b = make_b(f.b_shape, 12);
      Tensor w = Tensor::uniform({2, 3, 5}, -1, 1, 13);
      std::vector<float> vw = w.to_f32_vector();
      BinaryGrads g = binary_backward(op, w, a, b, true, true);
      ASSERT_EQ(g.da.shape(), a.shape());
      ASSERT_EQ(g.db.shape(), b.shape());
      EXPECT_EQ(g.db.dtype(), DType::f32);
      auto loss = [&] { return weighted_sum(binary(op, a, b), vw); };
      EXPECT_TRUE(check_gradient(a, loss, g.da, 1e-3, 1e-3, 1e-2)) << "da " << f.name << " " << binary_op_name(op);
      EXPECT_TRUE(check_gradient(b, loss, g.db, 1e-3, 1e-3, 1e-2)) << "db " << f.name << " " << binary_op_name(op);
    }
  }
}

TEST(Elementwise, BinaryBackwardSkipsUnneededGradients) {
  Tensor a = Tensor::uniform({4, 6}, -1, 1, 1), b = make_b({6}, 2), dy = Tensor::uniform({4, 6}, -1, 1, 3);
  BinaryGrads g = binary_backward(BinaryOp::mul, dy, a, b, false, true);
  EXPECT_FALSE(g.da.defined());
  EXPECT_TRUE(g.db.defined());
  g = binary_backward(BinaryOp::mul, dy, a, b, true, false);
  EXPECT_TRUE(g.da.defined());
  EXPECT_FALSE(g.db.defined());
  EXPECT_THROW(binary_backward(BinaryOp::mul, Tensor::zeros({4, 5}, DType::f32), a, b, true, true), Error);
}

TEST(Elementwise, SameShapeAddSubGradientsKeepTheDtype) { check_same_shape_grads(Device::cpu()); }

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU. Tolerances: the ops are single fp32 operations with IEEE division and no FMA on
// either side, so results are expected to be bitwise equal; the f32 tolerance (atol 1e-6, rtol 1e-6)
// and the bf16 one (one bf16 ulp: rtol 8e-3) only leave room for a future FMA. Gradient reductions:
// fp32 tree sums on CUDA vs double on the CPU -> atol 1e-4 * sqrt(rows), rtol 1e-4.

namespace {

struct CudaCase {
  int64_t R, C;
};
// Odd (scalar path), aligned (vec path), large (grid-stride loop takes several trips).
const CudaCase kCudaCases[] = {{37, 129}, {64, 128}, {2048, 4096}};

Shape b_shape_for(Broadcast bc, int64_t R, int64_t C) {
  switch (bc) {
    case Broadcast::same: return {R, C};
    case Broadcast::row: return {C};
    case Broadcast::col: return {R, 1};
    case Broadcast::scalar: return {1};
  }
  return {};
}

const Broadcast kBcasts[] = {Broadcast::same, Broadcast::row, Broadcast::col, Broadcast::scalar};
const char* bc_name(Broadcast bc) {
  static const char* n[] = {"same", "scalar", "row", "col"};
  return n[static_cast<int>(bc)];
}

float fwd_rtol(DType dt) { return dt == DType::bf16 ? 8e-3f : 1e-6f; }

}  // namespace

TEST(ElementwiseCuda, BinaryMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  const DType dts[] = {DType::f32, DType::bf16};
  for (const CudaCase& cs : kCudaCases) {
    const bool large = cs.R * cs.C > 1000000;
    for (DType adt : dts) {
      for (DType bdt : dts) {
        if (large && adt != bdt) continue;  // mixed dtypes are covered by the small shapes
        Tensor a = Tensor::uniform({cs.R, cs.C}, -1, 1, 21, adt);
        Tensor a_gpu = a.to(gpu);
        for (Broadcast bc : kBcasts) {
          Tensor b = make_b(b_shape_for(bc, cs.R, cs.C), 22, bdt);
          Tensor b_gpu = b.to(gpu);
          for (BinaryOp op : kOps) {
            Tensor y = binary(op, a_gpu, b_gpu);
            EXPECT_EQ(y.device(), gpu);
            EXPECT_EQ(y.dtype(), adt);
            EXPECT_TRUE(all_close(y, binary(op, a, b), 1e-6f, fwd_rtol(adt)))
                << cs.R << "x" << cs.C << " " << dtype_name(adt) << "/" << dtype_name(bdt) << " " << bc_name(bc) << " "
                << binary_op_name(op);
          }
        }
      }
    }
  }
}

TEST(ElementwiseCuda, MisalignedViewsTakeTheScalarPath) {
  OMNIQ_REQUIRE_CUDA();
  // A view starting one element into its storage cannot be read in 16-byte packs even though C % 4 == 0.
  const int64_t R = 33, C = 128;
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor base = Tensor::uniform({R * C + 1}, -1, 1, 31, dt);
    Tensor a = base.view_rows(1, R * C).reshape({R, C});
    Tensor b = make_b({C}, 32, dt);
    Tensor a_gpu = base.to(Device::cuda()).view_rows(1, R * C).reshape({R, C});
    Tensor b_gpu = b.to(Device::cuda());
    EXPECT_TRUE(all_close(mul(a_gpu, b_gpu), mul(a, b), 1e-6f, fwd_rtol(dt)));
    EXPECT_TRUE(all_close(scale(a_gpu, 3.0f), scale(a, 3.0f), 1e-6f, fwd_rtol(dt)));
    Tensor acc = a.clone(), acc_gpu = a_gpu.clone();
    Tensor g = Tensor::uniform({R * C + 1}, -1, 1, 33, dt);
    Tensor g_view = g.view_rows(1, R * C).reshape({R, C});
    Tensor g_gpu = g.to(Device::cuda()).view_rows(1, R * C).reshape({R, C});
    add_inplace(acc, g_view, 2.0f);
    add_inplace(acc_gpu, g_gpu, 2.0f);
    EXPECT_TRUE(all_close(acc_gpu, acc, 1e-6f, fwd_rtol(dt)));
  }
}

TEST(ElementwiseCuda, ScaleAndAddInplaceMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (const CudaCase& cs : kCudaCases) {
    for (DType adt : {DType::f32, DType::bf16}) {
      Tensor a = Tensor::uniform({cs.R, cs.C}, -1, 1, 41, adt);
      EXPECT_TRUE(all_close(scale(a.to(gpu), -0.75f), scale(a, -0.75f), 1e-6f, fwd_rtol(adt)));
      for (DType bdt : {DType::f32, DType::bf16}) {
        Tensor b = Tensor::uniform({cs.R, cs.C}, -1, 1, 42, bdt);
        Tensor acc = a.clone(), acc_gpu = a.to(gpu);
        add_inplace(acc, b, 0.3f);
        add_inplace(acc_gpu, b.to(gpu), 0.3f);
        EXPECT_TRUE(all_close(acc_gpu, acc, 1e-6f, fwd_rtol(adt)))
            << cs.R << "x" << cs.C << " " << dtype_name(adt) << " += " << dtype_name(bdt);
      }
    }
  }
}

TEST(ElementwiseCuda, BinaryBackwardMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (const CudaCase& cs : kCudaCases) {
    const float db_atol = 1e-4f * std::sqrt(static_cast<float>(std::max(cs.R, cs.C)));
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor a = Tensor::uniform({cs.R, cs.C}, -1, 1, 51, dt);
      Tensor dy = Tensor::uniform({cs.R, cs.C}, -1, 1, 52, dt);
      Tensor a_gpu = a.to(gpu), dy_gpu = dy.to(gpu);
      for (Broadcast bc : kBcasts) {
        Tensor b = make_b(b_shape_for(bc, cs.R, cs.C), 53, DType::f32);  // f32 parameter, as LET scales
        Tensor b_gpu = b.to(gpu);
        for (BinaryOp op : kOps) {
          BinaryGrads ref = binary_backward(op, dy, a, b, true, true);
          BinaryGrads got = binary_backward(op, dy_gpu, a_gpu, b_gpu, true, true);
          const std::string what = std::to_string(cs.R) + "x" + std::to_string(cs.C) + " " + dtype_name(dt) + " " +
                                   bc_name(bc) + " " + binary_op_name(op);
          EXPECT_EQ(got.da.dtype(), dt);
          EXPECT_EQ(got.db.dtype(), DType::f32);
          EXPECT_EQ(got.db.shape(), b.shape());
          EXPECT_TRUE(all_close(got.da, ref.da, 1e-6f, fwd_rtol(dt))) << "da " << what;
          EXPECT_TRUE(all_close(got.db, ref.db, db_atol, 1e-4f)) << "db " << what;
        }
      }
    }
  }
}

TEST(ElementwiseCuda, SameShapeAddSubGradientsKeepTheDtype) {
  OMNIQ_REQUIRE_CUDA();
  check_same_shape_grads(Device::cuda());
  // The LLaMA-7B residual shape: same-shape add/sub gradients are bitwise ±dy on both backends.
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor a = Tensor::uniform({2048, 4096}, -1, 1, 71, dt), b = Tensor::uniform({2048, 4096}, -1, 1, 72, dt);
    Tensor dy = Tensor::uniform({2048, 4096}, -1, 1, 73, dt);
    Tensor a_gpu = a.to(Device::cuda()), b_gpu = b.to(Device::cuda()), dy_gpu = dy.to(Device::cuda());
    for (BinaryOp op : {BinaryOp::add, BinaryOp::sub}) {
      BinaryGrads ref = binary_backward(op, dy, a, b, true, true);
      BinaryGrads got = binary_backward(op, dy_gpu, a_gpu, b_gpu, true, true);
      EXPECT_EQ(got.db.dtype(), dt);
      EXPECT_TRUE(all_close(got.da, ref.da, 0, 0)) << binary_op_name(op) << " " << dtype_name(dt);
      EXPECT_TRUE(all_close(got.db, ref.db, 0, 0)) << binary_op_name(op) << " " << dtype_name(dt);
    }
  }
}
