// The fused LWC step (ops/fake_quant_lwc_update.h) against the composition it replaces:
//   dγ, dβ = fake_quant_weight_backward;  AdamW on γ and β (scalars rows slot_gamma, slot_beta);
//   ŵ = fake_quant_weight_forward(γ', β').
// CPU: the fused CPU op equals the composition of the public ops, bitwise (γ, β, m, v, ŵ), over
//   several chained steps (the ŵ of step k is the cache step k + 1 starts from).
// CUDA (skipped without a GPU):
//   * fused vs the unfused CUDA ops the trainer runs (fake_quant_weight_backward,
//     adamw_step_many_indirect, fake_quant_weight_forward): bitwise γ, β, m, v and ŵ after every step
//     of 3 chained steps — the same team mapping and dscale summation order, the same AdamW element
//     update; g32/g128 and per-channel rows 384..28672 (warp teams, block teams, the re-read path of
//     rows longer than the registers/stage hold), non-vector rows, asym/sym, 2/3/4 bits, w f32/bf16/f16,
//     dy f32/bf16, ŵ bf16/f32;
//   * the streaming kernel (2 stages, and 3 with OMNIQ_FQ_STAGES=3; warp-team blocks of 256, 128, 64
//     threads with OMNIQ_LWC_TEAM_BLOCK) vs the register kernel (OMNIQ_FQ_V2_OLD=1): bitwise;
//   * a long row, then a short row through the same kernel template, then the long row again (the
//     kernel's dynamic-smem attribute must never be lowered below what a cached launch uses);
//   * fused CUDA vs fused CPU after one step: γ, β, m, v to a tolerance (the CPU sums dscale in double,
//     CUDA in fp32: dγ/dβ agree to |Δ| ≤ 3e-5·max|ref| + 1e-4·|ref|, test_fake_quant_v2_cuda's bound; m
//     is 0.1·dγ at step 1, v = 0.001·dγ², and γ' − γ ≈ −lr·sign(dγ) moves by ≪ 1e-5), ŵ bitwise equal
//     to the CPU forward of the CUDA γ', β'.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <cstdlib>
#include <string>
#include <vector>

#include "ops/adamw.h"
#include "ops/fake_quant.h"
#include "ops/fake_quant_lwc_update.h"
#include "runtime/error.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

struct Case {
  int64_t out, in;
  int bits, group;  // group 0: per-channel
  bool symmetric;
  DType w, dy, w_hat;
};

std::string name(const Case& c) {
  return "[" + std::to_string(c.out) + "x" + std::to_string(c.in) + "] W" + std::to_string(c.bits) +
         (c.group ? " g" + std::to_string(c.group) : " per-channel") + (c.symmetric ? " sym" : " asym") + " w " +
         dtype_name(c.w) + " dy " + dtype_name(c.dy) + " w_hat " + dtype_name(c.w_hat);
}

WeightQuantSpec spec_of(const Case& c) { return WeightQuantSpec{c.bits, c.group, c.symmetric}; }

// Six optimizer rows with different learning rates / weight decay, γ and β in rows 1 and 4: a kernel
// reading the wrong row (or the wrong parameter's) gives other bits.
constexpr int64_t kRows = 6, kSlotGamma = 1, kSlotBeta = 4;
std::vector<AdamWConfig> configs() {
  std::vector<AdamWConfig> c(kRows);
  for (int64_t i = 0; i < kRows; ++i) {
    c[i].lr = 1e-3f * static_cast<float>(i + 1);
    c[i].weight_decay = i == kSlotBeta ? 0.05f : 0.0f;
  }
  return c;
}

// Everything a fused step reads and updates, on one device.
struct State {
  Tensor w, gamma, beta, mg, vg, mb, vb;
};

State make_state(const Case& c, Device dev) {
  const int64_t g = spec_of(c).group_len(c.in), groups = c.out * (c.in / g);
  State s;
  // Awkward groups planted first (constant, all-positive, all-negative, tied max/min, zeros).
  s.w = Tensor::from_f32(make_groups(groups, g, 11 + c.in), {c.out, c.in}, c.w, dev);
  s.gamma = Tensor::uniform({groups}, -1.0f, 5.0f, 21, DType::f32, dev);  // σ 0.27..0.993: clipping
  s.beta = Tensor::uniform({groups}, -1.0f, 5.0f, 22, DType::f32, dev);
  for (Tensor* t : {&s.mg, &s.vg, &s.mb, &s.vb}) *t = Tensor::zeros({groups}, DType::f32, dev);  // the trainer's start
  return s;
}

Tensor dy_of(const Case& c, int step, Device dev) {
  return Tensor::uniform({c.out, c.in}, -1e-2f, 1e-2f, 100 + static_cast<uint64_t>(step), c.dy, dev);
}

Tensor scalars_of(int64_t step, Device dev) {
  return Tensor::from_f32(adamw_scalar_floats(configs(), step), {kRows * 7}, DType::f32, dev);
}

std::vector<float> host(const Tensor& t) { return t.to(Device::cpu()).to_f32_vector(); }

// What a run leaves: every step's ŵ (the one the step's GEMMs used) and the final one, and γ, β, m, v.
struct Trace {
  std::vector<std::vector<float>> w_hat;
  std::vector<float> gamma, beta, mg, vg, mb, vb;
};

void finish(Trace& tr, const State& s) {
  tr.gamma = host(s.gamma), tr.beta = host(s.beta);
  tr.mg = host(s.mg), tr.vg = host(s.vg), tr.mb = host(s.mb), tr.vb = host(s.vb);
}

// `steps` fused steps from a ŵ cache filled by the forward (as BlockQuantizer does).
Trace run_fused(const Case& c, Device dev, int steps) {
  State s = make_state(c, dev);
  const WeightQuantSpec spec = spec_of(c);
  Tensor w_hat = fake_quant_weight_forward(s.w, spec, &s.gamma, &s.beta, c.w_hat);
  Trace tr;
  for (int k = 0; k < steps; ++k) {
    tr.w_hat.push_back(host(w_hat));
    fake_quant_lwc_update(dy_of(c, k, dev), s.w, spec, s.gamma, s.beta, s.mg, s.vg, s.mb, s.vb, scalars_of(k + 1, dev),
                          kSlotGamma, kSlotBeta, w_hat);
  }
  tr.w_hat.push_back(host(w_hat));
  finish(tr, s);
  return tr;
}

// The same steps with the unfused ops (CPU: adamw_step; CUDA: adamw_step_many_indirect, as the trainer).
Trace run_unfused(const Case& c, Device dev, int steps) {
  State s = make_state(c, dev);
  const WeightQuantSpec spec = spec_of(c);
  Trace tr;
  for (int k = 0; k < steps; ++k) {
    tr.w_hat.push_back(host(fake_quant_weight_forward(s.w, spec, &s.gamma, &s.beta, c.w_hat)));
    FakeQuantWeightGrads g = fake_quant_weight_backward(dy_of(c, k, dev), s.w, spec, &s.gamma, &s.beta, false);
    const std::vector<AdamWConfig> cfg = configs();
    if (dev.is_cuda()) {
      std::vector<AdamWParam> ps(kRows, AdamWParam{nullptr, nullptr, nullptr, nullptr, AdamWConfig{}});
      for (int64_t i = 0; i < kRows; ++i) ps[i].cfg = cfg[i];
      ps[kSlotGamma] = {&s.gamma, &g.dgamma, &s.mg, &s.vg, cfg[kSlotGamma]};
      ps[kSlotBeta] = {&s.beta, &g.dbeta, &s.mb, &s.vb, cfg[kSlotBeta]};
      adamw_step_many_indirect(ps, scalars_of(k + 1, dev));
    } else {
      adamw_step(s.gamma, g.dgamma, s.mg, s.vg, cfg[kSlotGamma], k + 1);
      adamw_step(s.beta, g.dbeta, s.mb, s.vb, cfg[kSlotBeta], k + 1);
    }
  }
  tr.w_hat.push_back(host(fake_quant_weight_forward(s.w, spec, &s.gamma, &s.beta, c.w_hat)));
  finish(tr, s);
  return tr;
}

void expect_bitwise(const Trace& got, const Trace& ref, const std::string& what) {
  ASSERT_EQ(got.w_hat.size(), ref.w_hat.size()) << what;
  for (size_t k = 0; k < ref.w_hat.size(); ++k)
    EXPECT_TRUE(bit_equal(got.w_hat[k], ref.w_hat[k])) << what << " ŵ " << k;
  EXPECT_TRUE(bit_equal(got.gamma, ref.gamma)) << what << " gamma";
  EXPECT_TRUE(bit_equal(got.beta, ref.beta)) << what << " beta";
  EXPECT_TRUE(bit_equal(got.mg, ref.mg)) << what << " m_gamma";
  EXPECT_TRUE(bit_equal(got.vg, ref.vg)) << what << " v_gamma";
  EXPECT_TRUE(bit_equal(got.mb, ref.mb)) << what << " m_beta";
  EXPECT_TRUE(bit_equal(got.vb, ref.vb)) << what << " v_beta";
}

// The update did something (a test that compares two no-ops would pass vacuously).
void expect_moved(const Case& c, const Trace& tr) {
  const State s0 = make_state(c, Device::cpu());
  EXPECT_FALSE(bit_equal(tr.gamma, s0.gamma.to_f32_vector())) << name(c) << ": γ did not move";
  EXPECT_FALSE(bit_equal(tr.w_hat.back(), tr.w_hat.front())) << name(c) << ": ŵ did not change";
}

const DType f32 = DType::f32, bf16 = DType::bf16, f16 = DType::f16;

std::vector<Case> cpu_cases() {
  return {
      {16, 256, 4, 128, false, f32, f32, f32},     {12, 256, 3, 64, true, bf16, bf16, bf16},
      {6, 384, 2, 0, false, f16, bf16, bf16},      {4, 1024, 4, 0, true, f16, f32, bf16},
      {3, 100, 3, 0, false, f32, bf16, f32},
  };
}

// Rows 384 / 1024 (warp teams of 16 / 32 lanes), 4096 (block team of 128), 11008 (512), 28672 (longer than
// a 16-bit stage or the registers hold: the register kernel re-reads the excess), 100 (not a multiple of
// the 16-byte pack: one element per access); g32/g128 (teams of 4 lanes); f32 weights (4 per pack).
std::vector<Case> cuda_cases() {
  return {
      {96, 1024, 4, 128, false, f16, bf16, bf16},  {64, 4096, 3, 128, false, f16, bf16, bf16},
      {48, 512, 4, 128, true, bf16, bf16, bf16},   {40, 256, 2, 32, false, f16, f32, bf16},
      {70, 384, 4, 128, false, f32, f32, f32},     {24, 11008, 3, 0, false, f16, bf16, bf16},
      {24, 11008, 4, 0, true, bf16, f32, bf16},    {40, 384, 3, 0, false, f16, bf16, bf16},
      {33, 1024, 2, 0, true, f16, bf16, f32},      {16, 4096, 3, 0, false, f16, bf16, bf16},
      {16, 4096, 4, 0, false, f32, bf16, bf16},    {4, 28672, 3, 0, false, f16, bf16, bf16},
      {6, 100, 4, 0, false, f16, bf16, bf16},      {12, 11008, 2, 0, false, f32, f32, f32},
  };
}

struct ScopedEnv {
  const char* key;
  ScopedEnv(const char* k, const char* v) : key(k) { setenv(k, v, 1); }
  ~ScopedEnv() { unsetenv(key); }
};

}  // namespace

TEST(FakeQuantLwcUpdate, CpuFusedEqualsComposition) {
  for (const Case& c : cpu_cases()) {
    const Trace fused = run_fused(c, Device::cpu(), 3), ref = run_unfused(c, Device::cpu(), 3);
    expect_bitwise(fused, ref, name(c));
    expect_moved(c, fused);
  }
}

TEST(FakeQuantLwcUpdate, RejectsBadArguments) {
  const Case c{4, 256, 4, 128, false, f32, f32, f32};
  State s = make_state(c, Device::cpu());
  const WeightQuantSpec spec = spec_of(c);
  Tensor w_hat = Tensor::empty({4, 256}, f32);
  Tensor dy = dy_of(c, 0, Device::cpu());
  Tensor sc = scalars_of(1, Device::cpu());
  EXPECT_THROW(fake_quant_lwc_update(dy, s.w, spec, s.gamma, s.beta, s.mg, s.vg, s.mb, s.vb, sc, 0, kRows, w_hat),
               Error);  // slot out of range
  Tensor short_m = Tensor::zeros({3}, f32);
  EXPECT_THROW(fake_quant_lwc_update(dy, s.w, spec, s.gamma, s.beta, short_m, s.vg, s.mb, s.vb, sc, 0, 1, w_hat),
               Error);  // one moment per group
  Tensor alias = s.w.alias();
  EXPECT_THROW(fake_quant_lwc_update(dy, s.w, spec, s.gamma, s.beta, s.mg, s.vg, s.mb, s.vb, sc, 0, 1, alias),
               Error);  // ŵ written while w is read
  Tensor wrong = Tensor::empty({4, 128}, f32);
  EXPECT_THROW(fake_quant_lwc_update(dy, s.w, spec, s.gamma, s.beta, s.mg, s.vg, s.mb, s.vb, sc, 0, 1, wrong), Error);
  EXPECT_THROW(fake_quant_lwc_update(dy, s.w, WeightQuantSpec{16, 128, false}, s.gamma, s.beta, s.mg, s.vg, s.mb, s.vb,
                                     sc, 0, 1, w_hat),
               Error);  // nothing to fuse without quantization
  EXPECT_FALSE(fake_quant_lwc_update_supported(WeightQuantSpec{16, 0, false}, f16, bf16));
  EXPECT_TRUE(fake_quant_lwc_update_supported(WeightQuantSpec{3, 0, false}, f16, bf16));
}

TEST(FakeQuantLwcUpdateCuda, FusedEqualsUnfusedBitwise) {
  OMNIQ_REQUIRE_CUDA();
  for (const Case& c : cuda_cases()) {
    const Trace fused = run_fused(c, Device::cuda(), 3), ref = run_unfused(c, Device::cuda(), 3);
    expect_bitwise(fused, ref, name(c));
    expect_moved(c, fused);
  }
}

TEST(FakeQuantLwcUpdateCuda, StreamingKernelEqualsRegisterKernel) {
  OMNIQ_REQUIRE_CUDA();
  for (const Case& c : cuda_cases()) {
    const Trace stream = run_fused(c, Device::cuda(), 2);
    {
      ScopedEnv three("OMNIQ_FQ_STAGES", "3");
      expect_bitwise(run_fused(c, Device::cuda(), 2), stream, name(c) + " (3 stages)");
    }
    for (const char* block : {"128", "64"}) {
      ScopedEnv small("OMNIQ_LWC_TEAM_BLOCK", block);
      expect_bitwise(run_fused(c, Device::cuda(), 2), stream, name(c) + " (warp-team blocks of " + block + ")");
    }
    ScopedEnv old("OMNIQ_FQ_V2_OLD", "1");
    expect_bitwise(run_fused(c, Device::cuda(), 2), stream, name(c) + " (register kernel)");
  }
}

TEST(FakeQuantLwcUpdateCuda, MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const Case& c : cuda_cases()) {
    const Trace gpu = run_fused(c, Device::cuda(), 1), cpu = run_fused(c, Device::cpu(), 1);
    const std::string what = name(c);
    EXPECT_TRUE(bit_equal(gpu.w_hat[0], cpu.w_hat[0])) << what << " initial ŵ";
    EXPECT_TRUE(all_close(gpu.mg, cpu.mg, 3e-5f * max_abs(cpu.mg), 1e-4f)) << what << " m_gamma";
    EXPECT_TRUE(all_close(gpu.mb, cpu.mb, 3e-5f * max_abs(cpu.mb), 1e-4f)) << what << " m_beta";
    EXPECT_TRUE(all_close(gpu.vg, cpu.vg, 6e-5f * max_abs(cpu.vg), 2e-4f)) << what << " v_gamma";
    EXPECT_TRUE(all_close(gpu.vb, cpu.vb, 6e-5f * max_abs(cpu.vb), 2e-4f)) << what << " v_beta";
    EXPECT_TRUE(all_close(gpu.gamma, cpu.gamma, 1e-5f, 0.0f)) << what << " gamma";
    EXPECT_TRUE(all_close(gpu.beta, cpu.beta, 1e-5f, 0.0f)) << what << " beta";
    // ŵ' is the CPU forward of the GPU's γ', β', bit for bit.
    const State s = make_state(c, Device::cpu());
    const Tensor g = Tensor::from_f32(gpu.gamma, s.gamma.shape()), b = Tensor::from_f32(gpu.beta, s.beta.shape());
    const Tensor ref = fake_quant_weight_forward(s.w, spec_of(c), &g, &b, c.w_hat);
    EXPECT_TRUE(bit_equal(gpu.w_hat.back(), ref.to_f32_vector())) << what << " ŵ after the step";
  }
}


// One training step runs the same streaming kernel (per-channel block teams, f16 w, bf16 dŴ/ŵ) on rows of
// 11008 (down_proj, ~100 KB of stages) and of 4096 (~36 KB): the second must not lower the kernel's
// dynamic-shared-memory limit below what the first (cached) launch needs. Fused and unfused (the
// unfused streaming backward shares the occupancy cache), in the order of a backward pass, twice.
TEST(FakeQuantLwcUpdateCuda, LongRowAfterShortRowStillLaunches) {
  OMNIQ_REQUIRE_CUDA();
  const Case long_row{16, 11008, 3, 0, false, f16, bf16, bf16}, short_row{16, 4096, 3, 0, false, f16, bf16, bf16};
  for (int round = 0; round < 2; ++round) {
    for (const Case& c : {long_row, short_row}) {
      Trace fused, ref;
      ASSERT_NO_THROW(fused = run_fused(c, Device::cuda(), 1)) << name(c) << " round " << round;
      ASSERT_NO_THROW(ref = run_unfused(c, Device::cuda(), 1)) << name(c) << " round " << round;
      expect_bitwise(fused, ref, name(c));
    }
  }
}
