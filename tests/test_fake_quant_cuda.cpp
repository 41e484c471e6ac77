// Fake quantizers: CUDA against the CPU reference on the same inputs.
//   forward: bit-identical in f32 and in bf16 (same fp32 operations, same rounding, see
//            ops/fake_quant.h), for every kernel layout (warp teams of 2..32 lanes, 256/512-thread
//            blocks, 16-byte and scalar accesses, unaligned views, partial last blocks);
//   backward: dγ, dβ: |Δ| ≤ 3e-5·max|ref| + 1e-4·|ref| (the group sums run in another order, fp32
//            on the GPU vs double on the CPU); dw/dx: f32 1e-5·max|ref| + 1e-5·|ref|, bf16 also
//            allows one bf16 rounding step (rtol 8e-3) when the fp32 values straddle a midpoint.
// Large shapes (4096×11008 g128 and per-channel) included. Skipped without a GPU.
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

struct WCase {
  int64_t out, in;
  int bits, group;
  bool symmetric, lwc;
};

std::string name(const WCase& c) {
  return "[" + std::to_string(c.out) + "x" + std::to_string(c.in) + "] W" + std::to_string(c.bits) +
         (c.group ? " g" + std::to_string(c.group) : " per-channel") + (c.symmetric ? " sym" : "") +
         (c.lwc ? " lwc" : "");
}

// Shapes that reach every layout: n = 32..256 (teams of 2..32 lanes), 96 (partial team use, tail
// block), 2048 (f32: block of 256; bf16: team of 32 with 8 vectors per lane), 11008 (blocks).
std::vector<WCase> layout_cases() {
  std::vector<WCase> cs;
  const int64_t shapes[][2] = {{64, 256}, {5, 96}, {16, 2048}, {6, 11008}};
  for (const auto& s : shapes)
    for (int group : {0, 32, 64, 128})
      for (int bits : {2, 3, 4, 8})
        for (bool sym : {false, true})
          for (bool lwc : {false, true}) {
            if (s[1] % (group ? group : 1) != 0) continue;
            if (s[1] > 256 && bits != 3 && bits != 4) continue;  // keep the long rows to a few settings
            cs.push_back({s[0], s[1], bits, group, sym, lwc});
          }
  return cs;
}

struct Inputs {
  Tensor w, dy, gamma, beta;  // CPU; w/dy in the test dtype, gamma/beta f32
};

Inputs make_inputs(const WCase& c, DType dt, uint64_t seed) {
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  const int64_t n = spec.group_len(c.in), groups = spec.num_groups(c.out, c.in);
  Inputs in;
  in.w = Tensor::from_f32(make_groups(groups, n, seed), {c.out, c.in}, dt);
  in.dy = Tensor::uniform({c.out, c.in}, -1.0f, 1.0f, seed + 1, dt);
  in.gamma = Tensor::uniform({groups}, -1.0f, 5.0f, seed + 2);
  in.beta = Tensor::uniform({groups}, -1.0f, 5.0f, seed + 3);
  return in;
}

::testing::AssertionResult grads_close(const Tensor& got, const Tensor& ref, float atol_rel, float rtol) {
  const std::vector<float> r = ref.to_f32_vector();
  return all_close(got.to(Device::cpu()).to_f32_vector(), r, atol_rel * max_abs(r), rtol);
}

// Forward bit-exact and backward within tolerance, CUDA vs CPU, for one case and dtype.
void check_weight_case(const WCase& c, DType dt, uint64_t seed) {
  SCOPED_TRACE(name(c) + " " + dtype_name(dt));
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  Inputs in = make_inputs(c, dt, seed);
  Tensor w_d = in.w.to(kGpu), dy_d = in.dy.to(kGpu), g_d = in.gamma.to(kGpu), b_d = in.beta.to(kGpu);
  const Tensor* g = c.lwc ? &in.gamma : nullptr;
  const Tensor* b = c.lwc ? &in.beta : nullptr;
  Tensor y_ref = fake_quant_weight_forward(in.w, spec, g, b);
  Tensor y = fake_quant_weight_forward(w_d, spec, c.lwc ? &g_d : nullptr, c.lwc ? &b_d : nullptr);
  ASSERT_EQ(y.dtype(), dt);
  EXPECT_TRUE(bit_equal(y.to(Device::cpu()).to_f32_vector(), y_ref.to_f32_vector())) << "forward";

  FakeQuantWeightGrads r = fake_quant_weight_backward(in.dy, in.w, spec, g, b, true);
  FakeQuantWeightGrads d =
      fake_quant_weight_backward(dy_d, w_d, spec, c.lwc ? &g_d : nullptr, c.lwc ? &b_d : nullptr, true);
  ASSERT_EQ(d.dw.dtype(), dt);
  EXPECT_TRUE(grads_close(d.dw, r.dw, 1e-5f, dt == DType::bf16 ? 8e-3f : 1e-5f)) << "dw";
  if (c.lwc) {
    EXPECT_TRUE(grads_close(d.dgamma, r.dgamma, 3e-5f, 1e-4f)) << "dgamma";
    EXPECT_TRUE(grads_close(d.dbeta, r.dbeta, 3e-5f, 1e-4f)) << "dbeta";
    // The dw-less path (weight-only LWC training) gives the same dγ.
    FakeQuantWeightGrads d2 = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, false);
    EXPECT_FALSE(d2.dw.defined());
    EXPECT_TRUE(bit_equal(d2.dgamma.to(Device::cpu()).to_f32_vector(), d.dgamma.to(Device::cpu()).to_f32_vector()));
  }
}

}  // namespace

TEST(FakeQuantCuda, WeightMatchesCpuF32) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 100;
  for (const WCase& c : layout_cases()) check_weight_case(c, DType::f32, seed += 10);
}

TEST(FakeQuantCuda, WeightMatchesCpuBf16) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 500;
  for (const WCase& c : layout_cases()) check_weight_case(c, DType::bf16, seed += 10);
}

// The production shape of LLaMA-7B's up/gate projections, g128 and per-channel (rows of 11008 in
// the backward's block path), with random LWC; and a 28672-long per-channel row (Llama-2-70B).
TEST(FakeQuantCuda, LargeWeightsMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  check_weight_case({4096, 11008, 4, 128, false, true}, DType::f32, 1);
  check_weight_case({4096, 11008, 3, 0, false, true}, DType::f32, 2);
  check_weight_case({4096, 11008, 2, 128, false, true}, DType::bf16, 3);
  check_weight_case({8, 28672, 4, 0, false, true}, DType::bf16, 4);
  check_weight_case({8, 28672, 3, 0, true, true}, DType::f32, 5);
}

TEST(FakeQuantCuda, BackwardIsDeterministic) {
  OMNIQ_REQUIRE_CUDA();
  const WCase c{64, 4096, 4, 0, false, true};
  Inputs in = make_inputs(c, DType::bf16, 7);
  Tensor w = in.w.to(kGpu), dy = in.dy.to(kGpu), g = in.gamma.to(kGpu), b = in.beta.to(kGpu);
  FakeQuantWeightGrads a = fake_quant_weight_backward(dy, w, {4, 0}, &g, &b, true);
  FakeQuantWeightGrads a2 = fake_quant_weight_backward(dy, w, {4, 0}, &g, &b, true);
  EXPECT_TRUE(bit_equal(a.dgamma.to(Device::cpu()).to_f32_vector(), a2.dgamma.to(Device::cpu()).to_f32_vector()));
  EXPECT_TRUE(bit_equal(a.dw.to(Device::cpu()).to_f32_vector(), a2.dw.to(Device::cpu()).to_f32_vector()));
}

TEST(FakeQuantCuda, ActivationMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const std::vector<std::vector<int64_t>> shapes = {{7, 1},   {3, 3},   {5, 33},        {4, 100},   {2, 3, 4, 64},
                                                    {9, 128}, {3, 4096}, {6, 4097}, {2, 2, 11008}};
  uint64_t seed = 900;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (const auto& s : shapes) {
      const Shape shape(s);
      const int64_t C = s.back(), R = shape.numel() / C;
      for (int bits : {2, 4, 8}) {
        SCOPED_TRACE(shape.str() + " A" + std::to_string(bits) + " " + dtype_name(dt));
        seed += 3;
        Tensor x = Tensor::from_f32(make_groups(R, C, seed), shape, dt);
        Tensor dy = Tensor::uniform(shape, -1.0f, 1.0f, seed + 1, dt);
        Tensor x_d = x.to(kGpu), dy_d = dy.to(kGpu);
        EXPECT_TRUE(bit_equal(fake_quant_act_forward(x_d, bits).to(Device::cpu()).to_f32_vector(),
                              fake_quant_act_forward(x, bits).to_f32_vector()))
            << "forward";
        EXPECT_TRUE(grads_close(fake_quant_act_backward(dy_d, x_d, bits), fake_quant_act_backward(dy, x, bits), 1e-5f,
                                dt == DType::bf16 ? 8e-3f : 1e-5f))
            << "dx";
      }
    }
  }
}

// Views offset by one element cannot use 16-byte accesses: the scalar path must give the same bits.
TEST(FakeQuantCuda, UnalignedViewsMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t R = 40, C = 64;
    Tensor base = Tensor::uniform({1 + R * C}, -1.0f, 1.0f, 77, dt);
    Tensor base_d = base.to(kGpu);
    Tensor x = base.view_rows(1, R * C).reshape({R, C});
    Tensor x_d = base_d.view_rows(1, R * C).reshape({R, C});
    Tensor dy = Tensor::uniform({R, C}, -1.0f, 1.0f, 78, dt);
    EXPECT_TRUE(bit_equal(fake_quant_act_forward(x_d, 4).to(Device::cpu()).to_f32_vector(),
                          fake_quant_act_forward(x, 4).to_f32_vector()));
    EXPECT_TRUE(grads_close(fake_quant_act_backward(dy.to(kGpu), x_d, 4), fake_quant_act_backward(dy, x, 4), 1e-5f,
                            dt == DType::bf16 ? 8e-3f : 1e-5f));
    const WeightQuantSpec spec{3, 32};
    EXPECT_TRUE(bit_equal(fake_quant_weight_forward(x_d, spec, nullptr, nullptr).to(Device::cpu()).to_f32_vector(),
                          fake_quant_weight_forward(x, spec, nullptr, nullptr).to_f32_vector()));
  }
}

TEST(FakeQuantCuda, AbsFloorSteMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor s = Tensor::uniform({1000}, -0.05f, 0.05f, 88, dt);
    EXPECT_TRUE(bit_equal(abs_floor_ste(s.to(kGpu), 1e-2f).to(Device::cpu()).to_f32_vector(),
                          abs_floor_ste(s, 1e-2f).to_f32_vector()))
        << dtype_name(dt);
    Tensor dy = Tensor::uniform({1000}, -1.0f, 1.0f, 89, dt);
    EXPECT_TRUE(bit_equal(abs_floor_ste_backward(dy.to(kGpu)).to(Device::cpu()).to_f32_vector(), dy.to_f32_vector()));
  }
}

TEST(FakeQuantCuda, EmptyAndIdentityCases) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::zeros({0, 16}, DType::f32, kGpu);
  EXPECT_EQ(fake_quant_act_forward(x, 4).shape(), x.shape());
  EXPECT_EQ(fake_quant_act_backward(x, x, 4).shape(), x.shape());
  Tensor w = Tensor::uniform({4, 64}, -1.0f, 1.0f, 3, DType::bf16, kGpu);
  EXPECT_TRUE(bit_equal(fake_quant_weight_forward(w, {16, 0}, nullptr, nullptr).to(Device::cpu()).to_f32_vector(),
                        w.to(Device::cpu()).to_f32_vector()));
  // f16 has kernels too (the same templates): same bits as the CPU.
  Tensor h = Tensor::uniform({3, 40}, -1.0f, 1.0f, 5, DType::f16);
  EXPECT_TRUE(bit_equal(fake_quant_act_forward(h.to(kGpu), 4).to(Device::cpu()).to_f32_vector(),
                        fake_quant_act_forward(h, 4).to_f32_vector()));
  EXPECT_THROW(fake_quant_act_forward(Tensor::zeros({2, 8}, DType::i32, kGpu), 4), Error);  // not a float
}
