// LET-fused weight fake-quant on the CPU (ops/fake_quant_let.h) against the op chain it replaces
// (w·c, ÷/· r, fake_quant_weight — whose gradients tests/test_omniquant_grad_fixture.cpp checks
// against PyTorch). No finite-difference check: the quantizer is piecewise constant, its gradient is
// the straight-through rule, which only an autograd of the same formulas reproduces.
#include <gtest/gtest.h>

#include <cstring>

#include "fake_quant_let_test_util.h"
#include "ops/fake_quant_let.h"
#include "quant/block_quantizer.h"
#include "runtime/error.h"
#include "support/test_support.h"

namespace omniq {
namespace {

using test::LetCase;
using test::RowMode;

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  Tensor ac = a.to(Device::cpu()), bc = b.to(Device::cpu());
  return ac.dtype() == bc.dtype() && ac.numel() == bc.numel() &&
         std::memcmp(ac.data(), bc.data(), static_cast<size_t>(ac.numel()) * dtype_size(ac.dtype())) == 0;
}

// Gradients agree up to summation order: |Δ| ≤ 1e-5·max|ref| + 1e-4·|ref| elementwise.
void expect_grads_close(const test::LetOutputs& got, const test::LetOutputs& ref, const char* what) {
  auto check = [&](const Tensor& g, const Tensor& r, const char* name) {
    ASSERT_EQ(g.defined(), r.defined()) << what << " " << name;
    if (!r.defined()) return;
    std::vector<float> gv = g.to(Device::cpu()).to_f32_vector(), rv = r.to(Device::cpu()).to_f32_vector();
    float scale = 0.0f;
    for (float v : rv) scale = std::max(scale, std::fabs(v));
    EXPECT_TRUE(test::all_close(gv, rv, 1e-5f * scale + 1e-12f, 1e-4f)) << what << " " << name;
  };
  check(got.dgamma, ref.dgamma, "dgamma");
  check(got.dbeta, ref.dbeta, "dbeta");
  check(got.dcol, ref.dcol, "dcol");
  check(got.drow, ref.drow, "drow");
}

std::vector<LetCase> cases() {
  std::vector<LetCase> out;
  for (RowMode rm : {RowMode::none, RowMode::divide, RowMode::multiply})
    for (bool col : {false, true}) {
      if (!col && rm == RowMode::none) continue;
      for (bool lwc : {true, false}) {
        LetCase c{24, 64};
        c.col = col, c.row = rm, c.lwc = lwc;
        out.push_back(c);
      }
    }
  LetCase sym{16, 96};
  sym.symmetric = true, sym.bits = 3;
  out.push_back(sym);
  LetCase w8{9, 40};
  w8.bits = 8;
  out.push_back(w8);
  return out;
}

TEST(FakeQuantLet, ForwardEqualsOpChainBitwise) {
  int k = 0;
  for (LetCase c : cases()) {
    for (DType out : {DType::f32, DType::bf16}) {
      c.out_dtype = out;
      test::LetData d = test::make_let_data(c, 100 + k++);
      test::LetOutputs fused = test::run_let(c, d, Device::cpu(), true), chain = test::run_let(c, d, Device::cpu(), false);
      EXPECT_TRUE(bitwise_equal(fused.y, chain.y)) << "case " << k;
    }
  }
}

TEST(FakeQuantLet, BackwardMatchesOpChain) {
  int k = 0;
  for (const LetCase& c : cases()) {
    test::LetData d = test::make_let_data(c, 200 + k++);
    test::LetOutputs fused = test::run_let(c, d, Device::cpu(), true), chain = test::run_let(c, d, Device::cpu(), false);
    expect_grads_close(fused, chain, ("case " + std::to_string(k)).c_str());
  }
}

TEST(FakeQuantLet, F16WeightsGiveTheF32Result) {
  LetCase c{32, 128};
  test::LetData d = test::make_let_data(c, 7);
  test::LetOutputs a = test::run_let(c, d, Device::cpu(), true);
  c.w_dtype = DType::f16;
  test::LetOutputs b = test::run_let(c, d, Device::cpu(), true);
  EXPECT_TRUE(bitwise_equal(a.y, b.y));
  EXPECT_TRUE(bitwise_equal(a.dcol, b.dcol));
  EXPECT_TRUE(bitwise_equal(a.drow, b.drow));
  EXPECT_TRUE(bitwise_equal(a.dgamma, b.dgamma));
}

TEST(FakeQuantLet, GradientsAreNotTrivial) {  // the comparisons above must be able to fail
  LetCase c{24, 64};
  test::LetData d = test::make_let_data(c, 3);
  test::LetOutputs o = test::run_let(c, d, Device::cpu(), true);
  for (const Tensor* g : {&o.dcol, &o.drow, &o.dgamma, &o.dbeta}) {
    float m = 0.0f;
    for (float v : g->to_f32_vector()) m = std::max(m, std::fabs(v));
    EXPECT_GT(m, 1e-6f);
  }
}

TEST(FakeQuantLet, RejectsUnsupportedLayoutsClearly) {
  EXPECT_TRUE(fake_quant_let_supported(4096, 4096, WeightQuantSpec{4, 0, false}));
  EXPECT_FALSE(fake_quant_let_supported(4096, 4096, WeightQuantSpec{4, 128, false}));  // grouped
  EXPECT_FALSE(fake_quant_let_supported(4096, 16384, WeightQuantSpec{4, 0, false}));   // too long a row
  EXPECT_FALSE(fake_quant_let_supported(4096, 100, WeightQuantSpec{4, 0, false}));     // not a multiple of 8
  EXPECT_FALSE(fake_quant_let_supported(64, 64, WeightQuantSpec{16, 0, false}));       // not quantized
  Tensor w = Tensor::zeros({8, 64}, DType::f32);
  Tensor c = Tensor::full({32}, 1.0f, DType::f32);
  LetScales s;
  s.col = &c;
  try {
    fake_quant_let_forward(w, WeightQuantSpec{4, 0, false}, nullptr, nullptr, s, DType::f32);
    FAIL() << "expected an error for a column scale of the wrong length";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("column scale"), std::string::npos) << e.what();
  }
  try {
    fake_quant_let_forward(w, WeightQuantSpec{4, 32, false}, nullptr, nullptr, LetScales{}, DType::f32);
    FAIL() << "expected an error for a grouped weight";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("per-channel"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace omniq
