// RMSNorm / LayerNorm backward with dx_accum (ops/norm.h): the dx kernel adds the new dx into an
// existing gradient buffer in the pass that would write a fresh dx. Checked: the CPU reference
// against "fresh dx, then add" (bitwise in f32, one rounding of the fp32 sum in bf16), dw/db
// unaffected, argument checks, and CUDA against the CPU on both row layouts (a warp per row for
// C <= 1024, a block per row above) with and without 16-byte vector access.
#include <string>
#include <vector>

#include "ops/elementwise.h"
#include "ops/norm.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::all_close;

constexpr float kEps = 1e-5f;

struct Inputs {
  Tensor x, w, b, dy, mean, rstd, old;  // old: the gradient already in the buffer
};

Inputs make_inputs(bool layer, DType dt, const Shape& s, uint64_t seed) {
  Inputs in;
  const int64_t C = s.dims[s.ndim - 1];
  in.x = Tensor::uniform(s, -2.0f, 2.5f, seed, dt);
  in.w = Tensor::uniform({C}, 0.5f, 1.5f, seed + 1, DType::f32);
  in.b = Tensor::uniform({C}, -0.5f, 0.5f, seed + 2, DType::f32);
  in.dy = Tensor::uniform(s, -1.0f, 1.0f, seed + 3, dt);
  in.old = Tensor::uniform(s, -2.0f, 2.0f, seed + 4, dt);
  if (layer) layernorm_forward(in.x, in.w, in.b, kEps, &in.mean, &in.rstd);
  else rmsnorm_forward(in.x, in.w, kEps, &in.rstd);
  return in;
}

Inputs to_device(const Inputs& in, Device d) {
  Inputs o;
  o.x = in.x.to(d), o.w = in.w.to(d), o.b = in.b.to(d), o.dy = in.dy.to(d), o.old = in.old.to(d);
  if (in.mean.defined()) o.mean = in.mean.to(d);
  o.rstd = in.rstd.to(d);
  return o;
}

NormGrads backward(bool layer, const Inputs& in, Tensor* acc, bool dw = true) {
  return layer ? layernorm_backward(in.dy, in.x, in.w, in.mean, in.rstd, true, dw, dw, acc)
               : rmsnorm_backward(in.dy, in.x, in.w, in.rstd, true, dw, acc);
}

// Accumulated dx (into a copy of `old`), and the other gradients of the same call.
struct Accumulated {
  Tensor dx;
  NormGrads g;
};
Accumulated accumulate(bool layer, const Inputs& in, bool dw = true) {
  Accumulated a;
  a.dx = in.old.clone();
  a.g = backward(layer, in, &a.dx, dw);
  return a;
}

const char* norm_name(bool layer) { return layer ? "layernorm" : "rmsnorm"; }

TEST(NormAccumulate, CpuF32EqualsFreshDxThenAddBitwise) {
  for (bool layer : {false, true}) {
    SCOPED_TRACE(norm_name(layer));
    Inputs in = make_inputs(layer, DType::f32, Shape{3, 5, 40}, 1);
    NormGrads fresh = backward(layer, in, nullptr);
    Tensor want = in.old.clone();
    add_inplace(want, fresh.dx);
    Accumulated a = accumulate(layer, in);
    EXPECT_FALSE(a.g.dx.defined()) << "dx goes into the buffer, not into NormGrads";
    EXPECT_TRUE(all_close(a.dx, want, 0, 0));
    EXPECT_TRUE(all_close(a.g.dw, fresh.dw, 0, 0));
    if (layer) EXPECT_TRUE(all_close(a.g.db, fresh.db, 0, 0));
  }
}

TEST(NormAccumulate, CpuBf16RoundsTheFp32SumOnce) {
  // bf16: old + dx formed in fp32 (dx from the same bf16 inputs, computed in fp32) and rounded once.
  for (bool layer : {false, true}) {
    SCOPED_TRACE(norm_name(layer));
    Inputs in = make_inputs(layer, DType::bf16, Shape{6, 72}, 2);
    Inputs in32;
    in32.x = in.x.to(DType::f32), in32.w = in.w.clone(), in32.dy = in.dy.to(DType::f32);
    in32.rstd = in.rstd.clone();
    if (layer) in32.mean = in.mean.clone();
    NormGrads fresh32 = backward(layer, in32, nullptr, false);
    std::vector<float> want = in.old.to_f32_vector();
    const std::vector<float> d = fresh32.dx.to_f32_vector();
    for (size_t i = 0; i < want.size(); ++i) want[i] += d[i];
    Tensor want_bf16 = Tensor::from_f32(want, in.x.shape(), DType::bf16);
    Accumulated a = accumulate(layer, in, false);
    ASSERT_EQ(a.dx.dtype(), DType::bf16);
    EXPECT_TRUE(all_close(a.dx, want_bf16, 0, 0));
  }
}

TEST(NormAccumulate, BadBuffersThrow) {
  for (bool layer : {false, true}) {
    SCOPED_TRACE(norm_name(layer));
    Inputs in = make_inputs(layer, DType::f32, Shape{4, 16}, 3);
    Tensor wrong_shape = Tensor::zeros({16, 4}, DType::f32), wrong_dtype = Tensor::zeros({4, 16}, DType::bf16);
    EXPECT_THROW(backward(layer, in, &wrong_shape), Error);
    EXPECT_THROW(backward(layer, in, &wrong_dtype), Error);
    Tensor dy_view = in.dy.alias();  // the kernel would read dy while rewriting it
    EXPECT_THROW(backward(layer, in, &dy_view), Error);
    Tensor x_view = in.x.alias();
    EXPECT_THROW(backward(layer, in, &x_view), Error);
  }
}

TEST(NormAccumulate, NotNeededDxLeavesTheBufferAlone) {
  for (bool layer : {false, true}) {
    Inputs in = make_inputs(layer, DType::f32, Shape{4, 16}, 4);
    Tensor buf = in.old.clone();
    NormGrads g = layer ? layernorm_backward(in.dy, in.x, in.w, in.mean, in.rstd, false, true, true, &buf)
                        : rmsnorm_backward(in.dy, in.x, in.w, in.rstd, false, true, &buf);
    EXPECT_FALSE(g.dx.defined());
    EXPECT_TRUE(all_close(buf, in.old, 0, 0)) << norm_name(layer);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

// Shapes: warp rows vectorised (C = 40 f32: 4 | 40, bf16: 8 | 40), warp rows scalar (C = 37),
// block rows vectorised (C = 2048), block rows with bf16 scalar / f32 vector (C = 1500).
const std::vector<Shape> kShapes = {Shape{3, 5, 40}, Shape{17, 37}, Shape{9, 2048}, Shape{2, 3, 1500}};

// f32: atol 1e-5 rtol 1e-4 (fp32 row sums in another order). bf16: CPU of the same bf16 inputs;
// both round one fp32 sum: within one bf16 ulp (2^-8 relative; |dx| up to ~10): atol 2e-2 rtol 1e-2.
void check_cuda(bool layer, DType dt, const Shape& s) {
  SCOPED_TRACE(testing::Message() << norm_name(layer) << " " << dtype_name(dt) << " " << s.str());
  Inputs in = make_inputs(layer, dt, s, 10 + s.dims[s.ndim - 1]);
  Accumulated ref = accumulate(layer, in);
  Inputs ind = to_device(in, Device::cuda());
  Accumulated got = accumulate(layer, ind);
  const float atol = dt == DType::f32 ? 1e-5f : 2e-2f, rtol = dt == DType::f32 ? 1e-4f : 1e-2f;
  EXPECT_TRUE(all_close(got.dx.to(Device::cpu()), ref.dx, atol, rtol)) << "dx";
  EXPECT_TRUE(all_close(got.g.dw.to(Device::cpu()), ref.g.dw, 1e-3f, 1e-4f)) << "dw";
  if (layer) EXPECT_TRUE(all_close(got.g.db.to(Device::cpu()), ref.g.db, 1e-3f, 1e-4f)) << "db";
  // And the CUDA accumulation equals CUDA's own fresh dx plus old, within one rounding.
  NormGrads fresh = backward(layer, ind, nullptr);
  Tensor sum = add(ind.old, fresh.dx);
  EXPECT_TRUE(all_close(got.dx.to(Device::cpu()), sum.to(Device::cpu()), dt == DType::f32 ? 1e-6f : 2e-2f,
                        dt == DType::f32 ? 1e-6f : 1e-2f))
      << "accumulated vs fresh + add on CUDA";
}

TEST(NormAccumulateCuda, RmsNormMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Shape& s : kShapes) check_cuda(false, dt, s);
}

TEST(NormAccumulateCuda, LayerNormMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Shape& s : kShapes) check_cuda(true, dt, s);
}

TEST(NormAccumulateCuda, WithoutAccumulationUnchanged) {
  // The flag defaults off: a fresh dx on CUDA still matches the CPU's fresh dx.
  OMNIQ_REQUIRE_CUDA();
  for (bool layer : {false, true})
    for (DType dt : {DType::f32, DType::bf16}) {
      Inputs in = make_inputs(layer, dt, Shape{9, 2048}, 5);
      NormGrads ref = backward(layer, in, nullptr);
      NormGrads got = backward(layer, to_device(in, Device::cuda()), nullptr);
      const float tol = dt == DType::f32 ? 1e-4f : 2e-2f;
      EXPECT_TRUE(all_close(got.dx.to(Device::cpu()), ref.dx, tol, tol)) << norm_name(layer) << dtype_name(dt);
    }
}

}  // namespace
}  // namespace omniq
