// Weight fake-quant with mixed dtypes on the GPU, against the CPU reference on the same inputs:
//   forward: w f32|bf16|f16 → ŵ f32|bf16|f16 bit-identical to the CPU (the fp32 x̂ rounded once),
//            and bit-identical to the f32-output kernel followed by a cast;
//   backward: dy f32|bf16|f16 with any w dtype: dγ, dβ: |Δ| ≤ 3e-5·max|ref| + 1e-4·|ref| (group
//            sums in another order, fp32 on the GPU vs double on the CPU); dw (w's dtype): 1e-5·max|ref|
//            + rtol 1e-5 in f32, rtol 8e-3 (one rounding step) in bf16/f16; the dw-less path gives
//            bitwise the same dγ/dβ.
// Shapes reach every kernel layout: warp teams (g32/g64/g128), block teams of 128/256/512 threads,
// rows longer than a block's register tile (per-channel 20000 f32 / 40000 bf16 re-read the excess),
// the scalar path (rows of 50 and 1000 + an unaligned view), and the LLaMA-7B production shapes.
// Skipped without a GPU.
#include <string>
#include <vector>

#include "ops/fake_quant.h"
#include "runtime/error.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

const Device kGpu = Device::cuda(0);
const DType kFloats[] = {DType::f32, DType::bf16, DType::f16};

struct Case {
  int64_t out, in;
  int bits, group;
  bool symmetric, lwc;
};

std::string name(const Case& c) {
  return "[" + std::to_string(c.out) + "x" + std::to_string(c.in) + "] W" + std::to_string(c.bits) +
         (c.group ? " g" + std::to_string(c.group) : " per-channel") + (c.symmetric ? " sym" : " asym") +
         (c.lwc ? " lwc" : "");
}

// Every layout × {asym, sym} × {LWC, none}; groups 0 (per-channel), 32, 64, 128 where they divide.
std::vector<Case> cases() {
  std::vector<Case> cs;
  const int64_t shapes[][2] = {{64, 256}, {3, 50}, {5, 1000}, {16, 2048}, {6, 11008}, {5, 5000}};
  for (const auto& s : shapes)
    for (int group : {0, 32, 64, 128})
      for (bool sym : {false, true})
        for (bool lwc : {false, true}) {
          if (group && s[1] % group != 0) continue;
          cs.push_back({s[0], s[1], group == 64 ? 3 : 4, group, sym, lwc});
        }
  return cs;
}

struct Inputs {
  Tensor w, gamma, beta;  // CPU
};

Inputs make_inputs(const Case& c, DType wdt, uint64_t seed) {
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  const int64_t n = spec.group_len(c.in), groups = spec.num_groups(c.out, c.in);
  Inputs in;
  in.w = Tensor::from_f32(make_groups(groups, n, seed), {c.out, c.in}, wdt);
  in.gamma = Tensor::uniform({groups}, -1.0f, 5.0f, seed + 2);
  in.beta = Tensor::uniform({groups}, -1.0f, 5.0f, seed + 3);
  return in;
}

std::vector<float> host(const Tensor& t) { return t.to(Device::cpu()).to_f32_vector(); }

::testing::AssertionResult grads_close(const Tensor& got, const Tensor& ref, float atol_rel, float rtol) {
  const std::vector<float> r = ref.to_f32_vector();
  return all_close(host(got), r, atol_rel * max_abs(r), rtol);
}

void check_forward(const Case& c, DType wdt, DType odt, uint64_t seed) {
  SCOPED_TRACE(name(c) + " w " + dtype_name(wdt) + " -> " + dtype_name(odt));
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  Inputs in = make_inputs(c, wdt, seed);
  Tensor w_d = in.w.to(kGpu), g_d = in.gamma.to(kGpu), b_d = in.beta.to(kGpu);
  const Tensor* g = c.lwc ? &in.gamma : nullptr;
  const Tensor* b = c.lwc ? &in.beta : nullptr;
  const Tensor* gd = c.lwc ? &g_d : nullptr;
  const Tensor* bd = c.lwc ? &b_d : nullptr;
  Tensor ref = fake_quant_weight_forward(in.w, spec, g, b, odt);
  Tensor y = fake_quant_weight_forward(w_d, spec, gd, bd, odt);
  ASSERT_EQ(y.dtype(), odt);
  EXPECT_TRUE(bit_equal(host(y), ref.to_f32_vector())) << "CUDA vs CPU";
  // The one-op result is the f32 result rounded once (what fake-quant in f32 + cast gave).
  EXPECT_TRUE(bit_equal(host(y), host(fake_quant_weight_forward(w_d, spec, gd, bd, DType::f32).to(odt))))
      << "vs f32 then cast";
}

void check_backward(const Case& c, DType wdt, DType gdt, uint64_t seed) {
  SCOPED_TRACE(name(c) + " w " + dtype_name(wdt) + " dy " + dtype_name(gdt));
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  Inputs in = make_inputs(c, wdt, seed);
  Tensor dy = Tensor::uniform({c.out, c.in}, -1.0f, 1.0f, seed + 1, gdt);
  Tensor w_d = in.w.to(kGpu), dy_d = dy.to(kGpu), g_d = in.gamma.to(kGpu), b_d = in.beta.to(kGpu);
  const Tensor* g = c.lwc ? &in.gamma : nullptr;
  const Tensor* b = c.lwc ? &in.beta : nullptr;
  const Tensor* gd = c.lwc ? &g_d : nullptr;
  const Tensor* bd = c.lwc ? &b_d : nullptr;
  FakeQuantWeightGrads r = fake_quant_weight_backward(dy, in.w, spec, g, b, true);
  FakeQuantWeightGrads d = fake_quant_weight_backward(dy_d, w_d, spec, gd, bd, true);
  ASSERT_EQ(d.dw.dtype(), wdt);
  EXPECT_TRUE(grads_close(d.dw, r.dw, 1e-5f, wdt == DType::f32 ? 1e-5f : 8e-3f)) << "dw";
  if (!c.lwc) return;
  EXPECT_TRUE(grads_close(d.dgamma, r.dgamma, 3e-5f, 1e-4f)) << "dgamma";
  EXPECT_TRUE(grads_close(d.dbeta, r.dbeta, 3e-5f, 1e-4f)) << "dbeta";
  FakeQuantWeightGrads d2 = fake_quant_weight_backward(dy_d, w_d, spec, gd, bd, false);
  EXPECT_FALSE(d2.dw.defined());
  EXPECT_TRUE(bit_equal(host(d2.dgamma), host(d.dgamma))) << "dw-less dgamma";
  EXPECT_TRUE(bit_equal(host(d2.dbeta), host(d.dbeta))) << "dw-less dbeta";
}

}  // namespace

TEST(FakeQuantDtypesCuda, ForwardAnyInAnyOutMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 1000;
  for (const Case& c : cases())
    for (DType wdt : kFloats)
      for (DType odt : kFloats) check_forward(c, wdt, odt, seed += 10);
}

TEST(FakeQuantDtypesCuda, BackwardAnyDyDtypeMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 5000;
  for (const Case& c : cases())
    for (DType wdt : kFloats)
      for (DType gdt : kFloats) check_backward(c, wdt, gdt, seed += 10);
}

// Per-channel rows longer than the largest block's register tile (512 threads × 8 vectors): the
// excess is re-read. 20000 f32 = 5000 vectors, 40000 bf16 = 5000 vectors.
TEST(FakeQuantDtypesCuda, RowsLongerThanTheTileMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (bool sym : {false, true}) {
    check_forward({3, 20000, 4, 0, sym, true}, DType::f32, DType::bf16, 11);
    check_forward({3, 40000, 3, 0, sym, true}, DType::bf16, DType::f32, 12);
    check_backward({3, 20000, 4, 0, sym, true}, DType::f32, DType::f32, 13);
    check_backward({3, 40000, 4, 0, sym, true}, DType::bf16, DType::bf16, 14);
  }
}

// The training step's shapes: LLaMA-7B MLP weights, f32 master weights → bf16 ŵ, dy f32 from the
// dW GEMM (dγ/dβ only, as in LWC-only training, and with dw as with LET).
TEST(FakeQuantDtypesCuda, ProductionShapesMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  check_forward({4096, 11008, 4, 128, false, true}, DType::f32, DType::bf16, 21);
  check_forward({4096, 11008, 4, 0, false, true}, DType::f32, DType::bf16, 22);
  check_forward({11008, 4096, 4, 0, false, true}, DType::f32, DType::bf16, 23);
  check_backward({4096, 11008, 4, 128, false, true}, DType::f32, DType::f32, 24);
  check_backward({11008, 4096, 4, 0, false, true}, DType::f32, DType::f32, 25);
  check_backward({4096, 11008, 3, 0, true, true}, DType::f32, DType::bf16, 26);
}

// A view offset by one element cannot use vector accesses for y / dy: scalar path, same bits.
TEST(FakeQuantDtypesCuda, UnalignedDyAndOutputMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t R = 8, C = 256;
  const WeightQuantSpec spec{4, 128};
  Tensor w = Tensor::uniform({R, C}, -1.0f, 1.0f, 31);
  Tensor base = Tensor::uniform({1 + R * C}, -1.0f, 1.0f, 32, DType::bf16);
  Tensor dy = base.view_rows(1, R * C).reshape({R, C});
  Tensor base_d = base.to(kGpu);
  Tensor dy_d = base_d.view_rows(1, R * C).reshape({R, C});
  Tensor g = Tensor::uniform({R * 2}, -1.0f, 5.0f, 33), b = Tensor::uniform({R * 2}, -1.0f, 5.0f, 34);
  Tensor w_d = w.to(kGpu), g_d = g.to(kGpu), b_d = b.to(kGpu);
  FakeQuantWeightGrads r = fake_quant_weight_backward(dy, w, spec, &g, &b, true);
  FakeQuantWeightGrads d = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, true);
  EXPECT_TRUE(grads_close(d.dw, r.dw, 1e-5f, 1e-5f));
  EXPECT_TRUE(grads_close(d.dgamma, r.dgamma, 3e-5f, 1e-4f));
  EXPECT_TRUE(bit_equal(host(fake_quant_weight_forward(w_d, spec, &g_d, &b_d, DType::bf16)),
                        fake_quant_weight_forward(w, spec, &g, &b, DType::bf16).to_f32_vector()));
}

TEST(FakeQuantDtypesCuda, SixteenBitsConvertsToOutDtype) {
  OMNIQ_REQUIRE_CUDA();
  Tensor w = Tensor::uniform({4, 64}, -1.0f, 1.0f, 3, DType::f32, kGpu);
  Tensor y = fake_quant_weight_forward(w, {16, 0}, nullptr, nullptr, DType::bf16);
  EXPECT_EQ(y.dtype(), DType::bf16);
  EXPECT_TRUE(bit_equal(host(y), host(w.to(DType::bf16))));
  Tensor dy = Tensor::uniform({4, 64}, -1.0f, 1.0f, 4, DType::bf16, kGpu);
  FakeQuantWeightGrads gr = fake_quant_weight_backward(dy, w, {16, 0}, nullptr, nullptr, true);
  EXPECT_EQ(gr.dw.dtype(), DType::f32);
  EXPECT_TRUE(bit_equal(host(gr.dw), host(dy)));
}
