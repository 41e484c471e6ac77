// LET-fused weight fake-quant on CUDA against the CPU reference (ops/fake_quant_let.h):
// ŵ bit for bit (every dtype of w and ŵ), gradients to fp32 summation order, bitwise repeatable.
#include <gtest/gtest.h>

#include <cstring>

#include "fake_quant_let_test_util.h"
#include "ops/fake_quant_let.h"
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

}  // namespace
}  // namespace omniq
