// LET-fused weight fake-quant on CUDA against the CPU reference (ops/fake_quant_let.h):
// ŵ bit for bit (every dtype of w and ŵ), gradients to fp32 summation order, bitwise repeatable.
// The backward's default is the tile kernel (ops/cuda/fake_quant_let_backward.cu); the whole binary
// run with OMNIQ_FQ_LET_BWD_OLD=1 checks the block-per-row kernel instead, and NewBackwardAgreesWith
// OldKernel compares the two in one process (OMNIQ_FQ_V1=1, read per launch, selects the old one).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "fake_quant_let_test_util.h"
#include "ops/fake_quant_let.h"
#include "runtime/error.h"
#include "support/test_support.h"

namespace omniq {
namespace {

using test::LetCase;
using test::RowMode;

const Device kGpu = Device::cuda(0);

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  Tensor ac = a.to(Device::cpu()), bc = b.to(Device::cpu());
  return ac.dtype() == bc.dtype() && ac.numel() == bc.numel() &&
         std::memcmp(ac.data(), bc.data(), static_cast<size_t>(ac.numel()) * dtype_size(ac.dtype())) == 0;
}

// CUDA sums in fp32 in another order than the CPU's double: |Δ| ≤ 2e-5·max|ref| + 1e-3·|ref|.
void expect_close(const Tensor& got, const Tensor& ref, const std::string& what) {
  ASSERT_EQ(got.defined(), ref.defined()) << what;
  if (!ref.defined()) return;
  std::vector<float> g = got.to(Device::cpu()).to_f32_vector(), r = ref.to(Device::cpu()).to_f32_vector();
  float scale = 0.0f;
  for (float v : r) scale = std::max(scale, std::fabs(v));
  EXPECT_TRUE(test::all_close(g, r, 2e-5f * scale + 1e-12f, 1e-3f)) << what;
}

void compare(const LetCase& c, uint64_t seed, const std::string& what) {
  test::LetData d = test::make_let_data(c, seed);
  test::LetOutputs cpu = test::run_let(c, d, Device::cpu(), true), gpu = test::run_let(c, d, kGpu, true);
  EXPECT_TRUE(bitwise_equal(gpu.y, cpu.y)) << what << ": ŵ";
  expect_close(gpu.dgamma, cpu.dgamma, what + ": dgamma");
  expect_close(gpu.dbeta, cpu.dbeta, what + ": dbeta");
  expect_close(gpu.dcol, cpu.dcol, what + ": dcol");
  expect_close(gpu.drow, cpu.drow, what + ": drow");
}

TEST(FakeQuantLetCuda, EveryScaleCombinationMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (RowMode rm : {RowMode::none, RowMode::divide, RowMode::multiply})
    for (bool col : {false, true})
      for (bool lwc : {true, false}) {
        if (!col && rm == RowMode::none) continue;
        LetCase c{40, 256};
        c.col = col, c.row = rm, c.lwc = lwc;
        compare(c, 10 + k, "combination " + std::to_string(k));
        ++k;
      }
}

TEST(FakeQuantLetCuda, DtypesAndBitsMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (DType wdt : {DType::f32, DType::f16, DType::bf16})
    for (DType out : {DType::f32, DType::bf16, DType::f16})
      for (int bits : {2, 4, 8}) {
        LetCase c{33, 136};  // 136 = 17 vectors of 8: a partial last vector column per thread
        c.w_dtype = wdt, c.out_dtype = out, c.bits = bits, c.symmetric = bits == 2;
        compare(c, 40 + k, "dtype case " + std::to_string(k));
        ++k;
      }
}

// Production widths (block sizes 128, 160, 256 threads) and more rows than the backward's grid,
// so blocks walk several rows and the column partials add up across them.
TEST(FakeQuantLetCuda, ProductionShapesMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (int64_t cols : {4096, 5120, 8192}) {
    LetCase c{cols == 4096 ? 1200 : 96, cols};
    c.w_dtype = DType::f16, c.out_dtype = DType::bf16;
    compare(c, 70 + k++, "cols " + std::to_string(cols));
  }
}

TEST(FakeQuantLetCuda, BackwardIsBitwiseRepeatableAndTakesAnyDyDtype) {
  OMNIQ_REQUIRE_CUDA();
  LetCase c{1500, 4096};
  c.w_dtype = DType::f16;
  test::LetData d = test::make_let_data(c, 5);
  Tensor w = Tensor::from_f32(d.w, {c.rows, c.cols}, DType::f16, kGpu);
  Tensor col = Tensor::from_f32(d.col, {c.cols}, DType::f32, kGpu), row = Tensor::from_f32(d.row, {c.rows}, DType::f32, kGpu);
  Tensor g = Tensor::from_f32(d.gamma, {c.rows}, DType::f32, kGpu), b = Tensor::from_f32(d.beta, {c.rows}, DType::f32, kGpu);
  LetScales s;
  s.col = &col, s.row = &row, s.row_divide = true;
  const WeightQuantSpec spec{4, 0, false};
  for (DType dyt : {DType::f32, DType::bf16}) {
    Tensor dy = Tensor::from_f32(d.dy, {c.rows, c.cols}, dyt, kGpu);
    FakeQuantLetGrads a = fake_quant_let_backward(dy, w, spec, &g, &b, s);
    FakeQuantLetGrads a2 = fake_quant_let_backward(dy, w, spec, &g, &b, s);
    EXPECT_TRUE(bitwise_equal(a.dcol, a2.dcol));
    EXPECT_TRUE(bitwise_equal(a.drow, a2.drow));
    EXPECT_TRUE(bitwise_equal(a.dgamma, a2.dgamma));
    Tensor wc = w.to(Device::cpu()), cc = col.to(Device::cpu()), rc = row.to(Device::cpu());
    Tensor gc = g.to(Device::cpu()), bc = b.to(Device::cpu());
    LetScales sc;
    sc.col = &cc, sc.row = &rc, sc.row_divide = true;
    FakeQuantLetGrads ref = fake_quant_let_backward(dy.to(Device::cpu()), wc, spec, &gc, &bc, sc);
    const std::string what = std::string("dy ") + dtype_name(dyt);
    expect_close(a.dcol, ref.dcol, what + ": dcol");
    expect_close(a.drow, ref.drow, what + ": drow");
    expect_close(a.dgamma, ref.dgamma, what + ": dgamma");
    expect_close(a.dbeta, ref.dbeta, what + ": dbeta");
  }
}

// ---- the backward op called directly (no autograd): any dy dtype, crafted ties, big shapes ----

struct Grads {
  Tensor dgamma, dbeta, dcol, drow;
};

// fake_quant_let_backward on `dev` with w and dy as the CPU tensors wc, dyc (same values both ways).
Grads run_backward(const LetCase& c, const test::LetData& d, const Tensor& wc, const Tensor& dyc, Device dev) {
  Tensor w = wc.to(dev), dy = dyc.to(dev);
  Tensor col = Tensor::from_f32(d.col, {c.cols}, DType::f32, dev), row = Tensor::from_f32(d.row, {c.rows}, DType::f32, dev);
  Tensor g = Tensor::from_f32(d.gamma, {c.rows}, DType::f32, dev), b = Tensor::from_f32(d.beta, {c.rows}, DType::f32, dev);
  LetScales s;
  s.col = c.col ? &col : nullptr;
  s.row = c.row != RowMode::none ? &row : nullptr;
  s.row_divide = c.row == RowMode::divide;
  const WeightQuantSpec spec{c.bits, 0, c.symmetric};
  FakeQuantLetGrads r = fake_quant_let_backward(dy, w, spec, c.lwc ? &g : nullptr, c.lwc ? &b : nullptr, s);
  return {std::move(r.dgamma), std::move(r.dbeta), std::move(r.dcol), std::move(r.drow)};
}

void expect_grads_close(const Grads& got, const Grads& ref, const std::string& what) {
  expect_close(got.dgamma, ref.dgamma, what + ": dgamma");
  expect_close(got.dbeta, ref.dbeta, what + ": dbeta");
  expect_close(got.dcol, ref.dcol, what + ": dcol");
  expect_close(got.drow, ref.drow, what + ": drow");
}

void expect_grads_bitwise(const Grads& a, const Grads& b, const std::string& what) {
  for (auto [x, y, name] : {std::make_tuple(&a.dgamma, &b.dgamma, "dgamma"), std::make_tuple(&a.dbeta, &b.dbeta, "dbeta"),
                            std::make_tuple(&a.dcol, &b.dcol, "dcol"), std::make_tuple(&a.drow, &b.drow, "drow")}) {
    ASSERT_EQ(x->defined(), y->defined()) << what << ": " << name;
    if (x->defined()) EXPECT_TRUE(bitwise_equal(*x, *y)) << what << ": " << name << " differs between runs";
  }
}

// CUDA vs CPU on the op itself (dy in dy_dtype), plus a second CUDA run that must repeat the bits.
void compare_backward(const LetCase& c, const test::LetData& d, DType dy_dtype, const std::string& what) {
  Tensor wc = Tensor::from_f32(d.w, {c.rows, c.cols}, c.w_dtype), dyc = Tensor::from_f32(d.dy, {c.rows, c.cols}, dy_dtype);
  const Grads ref = run_backward(c, d, wc, dyc, Device::cpu());
  const Grads a = run_backward(c, d, wc, dyc, kGpu), b = run_backward(c, d, wc, dyc, kGpu);
  expect_grads_close(a, ref, what);
  expect_grads_bitwise(a, b, what);
}

float f16_exact(float v) { return f16_to_f32(f32_to_f16(v)); }

// Rows whose max / min is shared by several elements (in different threads' and warps' columns):
// constant rows (every element is both the max and the min), all-zero rows, a repeated max, a
// repeated max and min. A constant column scale (±2: exact) keeps the ties of w ties of u.
void add_ties(const LetCase& c, test::LetData& d, float col_scale) {
  for (float& v : d.col) v = col_scale;
  const int64_t n = c.cols;
  const std::vector<int64_t> spots = {0, 1, 7, 8, std::min<int64_t>(255, n - 1), std::min<int64_t>(256, n - 1), n / 2, n - 1};
  for (int64_t i = 0; i < c.rows; ++i) {
    float* r = &d.w[static_cast<size_t>(i * n)];
    float hi = 0.0f, lo = 0.0f;
    for (int64_t j = 0; j < n; ++j) hi = std::max(hi, r[j]), lo = std::min(lo, r[j]);
    switch (i % 6) {
      case 0: std::fill(r, r + n, f16_exact(0.01f * static_cast<float>(i % 4 + 1) * (i % 12 ? 1.0f : -1.0f))); break;
      case 1: std::fill(r, r + n, 0.0f); break;
      case 2: for (int64_t j : spots) r[j] = f16_exact(1.5f * hi); break;
      case 3:
        for (int64_t j : spots) r[j] = f16_exact(1.5f * hi);
        for (int64_t j : {int64_t{2}, n / 3, n - 2}) r[j] = f16_exact(1.5f * lo);
        break;
      case 4: r[n - 1] = r[0] = f16_exact(-0.001f); for (int64_t j = 1; j < n - 1; ++j) r[j] = 0.0f; break;  // max 0
      default: break;
    }
  }
}

TEST(FakeQuantLetBackwardCuda, EveryScaleCombinationBitsAndDtypes) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (RowMode rm : {RowMode::none, RowMode::divide, RowMode::multiply})
    for (bool col : {true, false})
      for (int bits : {2, 3, 4, 8})
        for (DType wdt : {DType::f16, DType::bf16, DType::f32}) {
          LetCase c{19 + 7 * (k % 3), 264};  // 33 vectors: threads with 1 and 2 vectors, odd row counts
          c.col = col, c.row = rm, c.bits = bits, c.w_dtype = wdt;
          c.symmetric = bits == 3 || (bits == 8 && wdt == DType::bf16);
          c.lwc = k % 5 != 4;
          const DType dyt = k % 3 == 0 ? DType::bf16 : (k % 3 == 1 ? DType::f32 : DType::f16);
          compare_backward(c, test::make_let_data(c, 100 + k), dyt, "case " + std::to_string(k));
          ++k;
        }
}

TEST(FakeQuantLetBackwardCuda, TiesConstantAndZeroRows) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (RowMode rm : {RowMode::none, RowMode::divide, RowMode::multiply})
    for (bool col : {true, false})
      for (bool sym : {false, true}) {
        LetCase c{50, k % 2 ? 4096 : 520};  // 4096: the production width (ties in both of a thread's vectors)
        c.col = col, c.row = rm, c.symmetric = sym, c.w_dtype = DType::f16, c.bits = sym ? 3 : 4;
        test::LetData d = test::make_let_data(c, 300 + k);
        add_ties(c, d, k % 3 == 1 ? -2.0f : 2.0f);
        compare_backward(c, d, DType::bf16, "ties " + std::to_string(k));
        ++k;
      }
}

// Widths of every vector count class (1 vector, < 1 per thread, 2 per thread, 2.5 and 4 per thread:
// the 4-vector instantiation), few rows (a grid of 1 block, tiles < 8 rows).
TEST(FakeQuantLetBackwardCuda, WidthsAndRowCounts) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (int64_t cols : {8, 16, 2048, 2056, 5120, 8192})
    for (int64_t rows : {1, 7, 9, 67}) {
      LetCase c{rows, cols};
      c.w_dtype = k % 2 ? DType::f16 : DType::f32;
      c.row = k % 3 == 0 ? RowMode::divide : (k % 3 == 1 ? RowMode::multiply : RowMode::none);
      compare_backward(c, test::make_let_data(c, 500 + k), DType::bf16, "cols " + std::to_string(cols) + " rows " +
                                                                            std::to_string(rows));
      ++k;
    }
}

TEST(FakeQuantLetBackwardCuda, RejectsWidthsNotMultipleOf8) {
  OMNIQ_REQUIRE_CUDA();
  Tensor w = Tensor::zeros({4, 100}, DType::f16, kGpu), dy = Tensor::zeros({4, 100}, DType::bf16, kGpu);
  Tensor col = Tensor::zeros({100}, DType::f32, kGpu);
  LetScales s;
  s.col = &col;
  EXPECT_THROW(fake_quant_let_backward(dy, w, WeightQuantSpec{4, 0, false}, nullptr, nullptr, s), Error);
}

// The 7B shapes of the W4A4 step (f16 w, bf16 dy, LWC): q/v (÷ r), k (· r), gate/up (columns only).
TEST(FakeQuantLetBackwardCuda, ProductionShapesMatchCpuAndRepeat) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (auto [rows, rm] : {std::make_pair(int64_t{4096}, RowMode::divide), std::make_pair(int64_t{4096}, RowMode::multiply),
                          std::make_pair(int64_t{11008}, RowMode::none)}) {
    LetCase c{rows, 4096};
    c.w_dtype = DType::f16, c.row = rm;
    compare_backward(c, test::make_let_data(c, 900 + k), DType::bf16, "7B shape " + std::to_string(k));
    ++k;
  }
}

TEST(FakeQuantLetBackwardCuda, NewBackwardAgreesWithOldKernel) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (RowMode rm : {RowMode::none, RowMode::divide, RowMode::multiply}) {
    LetCase c{300, 4096};
    c.w_dtype = DType::f16, c.row = rm;
    test::LetData d = test::make_let_data(c, 950 + k);
    if (k == 1) add_ties(c, d, 2.0f);
    Tensor wc = Tensor::from_f32(d.w, {c.rows, c.cols}, c.w_dtype), dyc = Tensor::from_f32(d.dy, {c.rows, c.cols}, DType::bf16);
    const Grads now = run_backward(c, d, wc, dyc, kGpu);
    setenv("OMNIQ_FQ_V1", "1", 1);
    const Grads old = run_backward(c, d, wc, dyc, kGpu);
    unsetenv("OMNIQ_FQ_V1");
    expect_grads_close(now, old, "new vs old " + std::to_string(k));
    ++k;
  }
}

}  // namespace
}  // namespace omniq
