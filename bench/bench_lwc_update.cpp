// The fused LWC step (ops/fake_quant_lwc_update.h) against the unfused ops it replaces, at LLaMA-2-7B
// weight shapes in the training step's dtypes (f16 w, bf16 dŴ and ŵ), W4 g128 and W3 per-channel:
// per weight shape the fused op (default streaming kernel, and its A/B switches: 3 stages, warp-team
// blocks of 128 / 64 threads, the register kernel), and the unfused backward (dγ/dβ), AdamW on γ, β and
// forward; then the sums over one block (q, k, v, o ×4, gate, up ×2, down ×1).
// Napkin math: fused moves 2 (w) + 2 (dŴ) + 2 (ŵ) = 6 bytes per weight; unfused 4 (bwd) + 4 (fwd) = 8,
// plus AdamW's 28 bytes per group. GB/s and % of peak (H100 SXM ≈ 3350 GB/s; --peak-gbs) use those.
// Timed with CUDA events around `reps` back-to-back launches (bench/bench_timing.h). Flags: --reps N,
// --peak-gbs X. Not a test.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/adamw.h"
#include "ops/fake_quant.h"
#include "ops/fake_quant_lwc_update.h"
#include "runtime/tensor.h"
#ifdef OMNIQ_HAS_CUDA
#include "bench/bench_timing.h"
#include "runtime/cuda_context.h"
#endif

using namespace omniq;

namespace {

#ifdef OMNIQ_HAS_CUDA
double time_ms(const std::function<void()>& f, int reps) { return bench::time_ms(cuda_context(0).stream, 3, reps, f); }

// Sets an A/B switch while alive (value null: the default).
struct ScopedEnv {
  const char* key;
  ScopedEnv(const char* k, const char* v) : key(k) {
    if (v) setenv(k, v, 1);
  }
  ~ScopedEnv() { unsetenv(key); }
};

struct Variant {
  const char* label;
  const char* key;
  const char* value;
};
const Variant kVariants[] = {{"fused (default)", nullptr, nullptr},
                             {"fused, 3 stages", "OMNIQ_FQ_STAGES", "3"},
                             {"fused, team blocks 128", "OMNIQ_LWC_TEAM_BLOCK", "128"},
                             {"fused, team blocks 64", "OMNIQ_LWC_TEAM_BLOCK", "64"},
                             {"fused, register kernel", "OMNIQ_FQ_V2_OLD", "1"}};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

struct Times {
  double fused[kNumVariants];
  double bwd, adamw, fwd;
};

void line(const std::string& what, double ms, double bytes, double peak) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("  %-44s %8.4f ms  %7.0f GB/s  %5.1f%%\n", what.c_str(), ms, gbs, 100.0 * gbs / peak);
}

Times bench_weight(int64_t out, int64_t in, const WeightQuantSpec& spec, int reps, double peak) {
  const Device dev = Device::cuda();
  const int64_t groups = spec.num_groups(out, in), n = out * in;
  Tensor w = Tensor::uniform({out, in}, -1, 1, 1, DType::f16, dev);
  Tensor dy = Tensor::uniform({out, in}, -1e-2f, 1e-2f, 2, DType::bf16, dev);
  Tensor gamma = Tensor::uniform({groups}, 3, 5, 3, DType::f32, dev);
  Tensor beta = Tensor::uniform({groups}, 3, 5, 4, DType::f32, dev);
  Tensor mg = Tensor::zeros({groups}, DType::f32, dev), vg = Tensor::zeros({groups}, DType::f32, dev);
  Tensor mb = Tensor::zeros({groups}, DType::f32, dev), vb = Tensor::zeros({groups}, DType::f32, dev);
  const std::vector<AdamWConfig> cfg(2, AdamWConfig{1e-6f});
  Tensor scalars = Tensor::from_f32(adamw_scalar_floats(cfg, 1), {14}, DType::f32, dev);
  Tensor w_hat = fake_quant_weight_forward(w, spec, &gamma, &beta, DType::bf16);
  std::printf("[%lldx%lld] %s:\n", static_cast<long long>(out), static_cast<long long>(in),
              spec.group_size ? "W4 g128" : "W3 per-channel");
  Times t{};
  for (int v = 0; v < kNumVariants; ++v) {
    ScopedEnv env(kVariants[v].key ? kVariants[v].key : "OMNIQ_BENCH_UNUSED", kVariants[v].value);
    t.fused[v] = time_ms([&] {
      fake_quant_lwc_update(dy, w, spec, gamma, beta, mg, vg, mb, vb, scalars, 0, 1, w_hat);
    }, reps);
    line(kVariants[v].label, t.fused[v], 6.0 * n, peak);
  }
  FakeQuantWeightGrads g = fake_quant_weight_backward(dy, w, spec, &gamma, &beta, false);
  t.bwd = time_ms([&] { g = fake_quant_weight_backward(dy, w, spec, &gamma, &beta, false); }, reps);
  line("unfused backward (dγ, dβ)", t.bwd, 4.0 * n, peak);
  std::vector<AdamWParam> ps = {{&gamma, &g.dgamma, &mg, &vg, cfg[0]}, {&beta, &g.dbeta, &mb, &vb, cfg[1]}};
  t.adamw = time_ms([&] { adamw_step_many_indirect(ps, scalars); }, reps);
  line("unfused AdamW (γ, β)", t.adamw, 2.0 * 28.0 * groups, peak);
  t.fwd = time_ms([&] { w_hat = fake_quant_weight_forward(w, spec, &gamma, &beta, DType::bf16); }, reps);
  line("unfused forward", t.fwd, 4.0 * n, peak);
  line("unfused sum", t.bwd + t.adamw + t.fwd, 8.0 * n, peak);
  return t;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  double peak = 3350;
  int reps = 50;
  for (int i = 1; i + 1 < argc; ++i) {
    if (!std::strcmp(argv[i], "--peak-gbs")) peak = std::atof(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[++i]);
  }
#ifdef OMNIQ_HAS_CUDA
  if (!cuda_available()) {
    std::puts("bench_lwc_update: no CUDA device visible; nothing to measure");
    return 0;
  }
  const int64_t C = 4096, F = 11008;
  const double weights = 4.0 * C * C + 3.0 * C * F;
  for (int group : {128, 0}) {
    const WeightQuantSpec spec{group ? 4 : 3, group, false};
    const Times a = bench_weight(C, C, spec, reps, peak), b = bench_weight(F, C, spec, reps, peak),
                c = bench_weight(C, F, spec, reps, peak);
    std::printf("=> LLaMA-7B block %s (q, k, v, o ×4, gate, up ×2, down ×1):\n", group ? "W4A16 g128" : "W3A16 per-channel");
    for (int v = 0; v < kNumVariants; ++v)
      line(kVariants[v].label, 4 * a.fused[v] + 2 * b.fused[v] + c.fused[v], 6.0 * weights, peak);
    auto sum = [&](double Times::*f) { return 4 * a.*f + 2 * b.*f + c.*f; };
    line("unfused (bwd + AdamW per weight + fwd)", sum(&Times::bwd) + sum(&Times::adamw) + sum(&Times::fwd),
         8.0 * weights, peak);
    std::printf("   (the trainer runs one AdamW launch for all 14 tensors, not 7: its share is smaller)\n");
  }
#else
  (void)peak;
  (void)reps;
  std::puts("bench_lwc_update: built without CUDA; nothing to measure");
#endif
  return 0;
}
