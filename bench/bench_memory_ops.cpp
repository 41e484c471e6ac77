// Memory-bound ops on the GPU: time, achieved GB/s and % of the HBM peak (H100 SXM ≈ 3.35 TB/s;
// override with --peak-gbs). Shapes are LLaMA-2-7B activations/weights (2048 tokens × 4096) and
// the 4096 × 11008 weight of an MLP projection, plus the weight fake-quant path of one OmniQuant
// training step (f32 master weights → bf16 ŵ, dy f32) per weight and summed over a 7B block.
// Then the fake-quant kernels in the training step's dtypes (f16 weights, bf16 ŵ and dŵ), v2 (the
// default) against v1 (OMNIQ_FQ_V1=1, set per measurement): weight-only W4 g128 and per-channel, the
// LET-fused per-channel op of W4A4, per 7B weight shape and summed over a block. The weight-only
// backward also against the first v2 kernel (OMNIQ_FQ_V2_OLD=1) and the 3-stage stream (OMNIQ_FQ_STAGES=3).
// Flags: --reps N, --peak-gbs X, --fake-quant-only (skip the activation ops), --ab-only (only the
// v2-vs-v1 section). Not a test.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include <cuda_runtime.h>

#include "ops/activation.h"
#include "ops/elementwise.h"
#include "ops/fake_quant.h"
#include "ops/fake_quant_let.h"
#include "ops/norm.h"
#include "bench/bench_timing.h"
#include "runtime/cuda_context.h"
#include "runtime/tensor.h"

using namespace omniq;

namespace {

double time_ms(const std::function<void()>& f, int reps) { return bench::time_ms(cuda_context(0).stream, 3, reps, f); }

void report(const char* name, double ms, double bytes, double peak_gbs) {
  double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-52s %8.3f ms  %8.1f GB/s  %5.1f%% of peak\n", name, ms, gbs, 100.0 * gbs / peak_gbs);
}

// One weight's fake-quant forward (f32 master → bf16 ŵ) and backward (dy f32 from the dW GEMM,
// dγ/dβ only) with LWC; prints both and returns their times.
struct FqTimes {
  double fwd_ms, bwd_ms;
};

FqTimes bench_fake_quant(const char* what, int64_t out, int64_t in, int group, int reps, double peak) {
  Device g = Device::cuda();
  const WeightQuantSpec spec{4, group, false};
  const int64_t groups = spec.num_groups(out, in), n = out * in;
  Tensor w = Tensor::uniform({out, in}, -0.05f, 0.05f, 11, DType::f32, g);
  Tensor dy = Tensor::uniform({out, in}, -1e-3f, 1e-3f, 12, DType::f32, g);
  Tensor gamma = Tensor::full({groups}, 4.0f, DType::f32, g), beta = Tensor::full({groups}, 4.0f, DType::f32, g);
  char name[128];
  std::snprintf(name, sizeof name, "fq fwd f32->bf16 %-11s [%lldx%lld]", what, static_cast<long long>(out),
                static_cast<long long>(in));
  FqTimes t;
  // Napkin math: read w (4 B), write ŵ (2 B); the backward reads w and dy (4 + 4 B); γ/β are 1/g of it.
  t.fwd_ms = time_ms([&] { fake_quant_weight_forward(w, spec, &gamma, &beta, DType::bf16); }, reps);
  report(name, t.fwd_ms, n * 6.0 + groups * 8.0, peak);
  std::snprintf(name, sizeof name, "fq bwd dy f32 dgamma/dbeta %-9s [%lldx%lld]", what, static_cast<long long>(out),
                static_cast<long long>(in));
  t.bwd_ms = time_ms([&] { fake_quant_weight_backward(dy, w, spec, &gamma, &beta, false); }, reps);
  report(name, t.bwd_ms, n * 8.0 + groups * 16.0, peak);
  return t;
}

// f() timed with the v2 kernels (default) and with OMNIQ_FQ_V1=1; prints both lines and returns
// {v2 ms, v1 ms}.
struct AbTimes {
  double v2, v1;
  double v2_old = 0;  // the first v2 backward (OMNIQ_FQ_V2_OLD=1) where it differs from v2; else v2
};

AbTimes time_ab(const char* name, const std::function<void()>& f, double bytes, int reps, double peak) {
  AbTimes t;
  unsetenv("OMNIQ_FQ_V1");
  t.v2 = time_ms(f, reps);
  setenv("OMNIQ_FQ_V1", "1", 1);
  t.v1 = time_ms(f, reps);
  unsetenv("OMNIQ_FQ_V1");
  char line[160];
  std::snprintf(line, sizeof line, "%s  v2", name);
  report(line, t.v2, bytes, peak);
  std::snprintf(line, sizeof line, "%s  v1", name);
  report(line, t.v1, bytes, peak);
  return t;
}

struct AbPair {
  AbTimes fwd, bwd;
};

// Weight-only LWC fake-quant of one [out, in] weight as in the W4A16 step: f16 w → bf16 ŵ; backward
// from a bf16 dŵ, dγ/dβ only. Bytes: 2 + 2 (forward), 2 + 2 (backward) per weight, + γ/β per group.
AbPair ab_weight(int64_t out, int64_t in, int group, int reps, double peak) {
  Device g = Device::cuda();
  const WeightQuantSpec spec{4, group, false};
  const int64_t groups = spec.num_groups(out, in), n = out * in;
  Tensor w = Tensor::uniform({out, in}, -0.05f, 0.05f, 21, DType::f16, g);
  Tensor dy = Tensor::uniform({out, in}, -1e-3f, 1e-3f, 22, DType::bf16, g);
  Tensor gamma = Tensor::full({groups}, 4.0f, DType::f32, g), beta = Tensor::full({groups}, 4.0f, DType::f32, g);
  char name[96];
  AbPair r;
  std::snprintf(name, sizeof name, "fq fwd f16->bf16 %-8s [%lldx%lld]", group ? "g128" : "per-chan",
                static_cast<long long>(out), static_cast<long long>(in));
  auto fwd = [&] { fake_quant_weight_forward(w, spec, &gamma, &beta, DType::bf16); };
  r.fwd = time_ab(name, fwd, n * 4.0 + groups * 8.0, reps, peak);
  if (group) {  // the v2 forward's warp teams with 8 vectors per lane (OMNIQ_FQ_LANE_VECS=8)
    setenv("OMNIQ_FQ_LANE_VECS", "8", 1);
    std::strncat(name, "  v2 8-vec lanes", sizeof name - std::strlen(name) - 1);
    report(name, time_ms(fwd, reps), n * 4.0 + groups * 8.0, peak);
    unsetenv("OMNIQ_FQ_LANE_VECS");
  }
  std::snprintf(name, sizeof name, "fq bwd dy bf16 %-10s [%lldx%lld]", group ? "g128" : "per-chan",
                static_cast<long long>(out), static_cast<long long>(in));
  auto bwd = [&] { fake_quant_weight_backward(dy, w, spec, &gamma, &beta, false); };
  const double bwd_bytes = n * 4.0 + groups * 16.0;
  r.bwd = time_ab(name, bwd, bwd_bytes, reps, peak);
  // The streaming backward (the v2 default now) against the first v2 kernel and with 3 stages.
  char line[160];
  setenv("OMNIQ_FQ_V2_OLD", "1", 1);
  r.bwd.v2_old = time_ms(bwd, reps);
  unsetenv("OMNIQ_FQ_V2_OLD");
  std::snprintf(line, sizeof line, "%s  v2-old (OMNIQ_FQ_V2_OLD=1)", name);
  report(line, r.bwd.v2_old, bwd_bytes, peak);
  setenv("OMNIQ_FQ_STAGES", "3", 1);
  std::snprintf(line, sizeof line, "%s  v2 3 stages (OMNIQ_FQ_STAGES=3)", name);
  report(line, time_ms(bwd, reps), bwd_bytes, peak);
  unsetenv("OMNIQ_FQ_STAGES");
  return r;
}

// The LET-fused per-channel fake-quant of W4A4 (f16 w, f32 column scale, optional row scale, bf16 ŵ
// and dŵ). Bytes: 2 + 2 per weight both ways (the scales and the backward's column partials are
// ≤ 1% of it at these shapes and not counted).
AbPair ab_let(int64_t out, int64_t in, bool row, bool divide, int reps, double peak) {
  Device g = Device::cuda();
  const WeightQuantSpec spec{4, 0, false};
  const int64_t n = out * in;
  Tensor w = Tensor::uniform({out, in}, -0.05f, 0.05f, 31, DType::f16, g);
  Tensor dy = Tensor::uniform({out, in}, -1e-3f, 1e-3f, 32, DType::bf16, g);
  Tensor gamma = Tensor::full({out}, 4.0f, DType::f32, g), beta = Tensor::full({out}, 4.0f, DType::f32, g);
  Tensor col = Tensor::uniform({in}, 0.5f, 2.0f, 33, DType::f32, g);
  Tensor rs = Tensor::uniform({out}, 0.5f, 2.0f, 34, DType::f32, g);
  LetScales let;
  let.col = &col;
  let.row = row ? &rs : nullptr;
  let.row_divide = divide;
  const char* kind = !row ? "col" : divide ? "col,row/" : "col,row*";
  char name[96];
  AbPair r;
  std::snprintf(name, sizeof name, "fq+LET fwd %-8s [%lldx%lld]", kind, static_cast<long long>(out),
                static_cast<long long>(in));
  r.fwd = time_ab(name, [&] { fake_quant_let_forward(w, spec, &gamma, &beta, let, DType::bf16); }, n * 4.0, reps, peak);
  std::snprintf(name, sizeof name, "fq+LET bwd %-8s [%lldx%lld]", kind, static_cast<long long>(out),
                static_cast<long long>(in));
  r.bwd = time_ab(name, [&] { fake_quant_let_backward(dy, w, spec, &gamma, &beta, let); }, n * 4.0, reps, peak);
  return r;
}

void sum_line(const char* what, const AbPair* parts, const int* count, int k, double weights, double peak) {
  double v2 = 0, v1 = 0, v2_old = 0;
  auto old_or = [](const AbTimes& t) { return t.v2_old > 0 ? t.v2_old : t.v2; };
  for (int i = 0; i < k; ++i) {
    v2 += count[i] * (parts[i].fwd.v2 + parts[i].bwd.v2);
    v1 += count[i] * (parts[i].fwd.v1 + parts[i].bwd.v1);
    v2_old += count[i] * (old_or(parts[i].fwd) + old_or(parts[i].bwd));
  }
  const double bytes = weights * 8.0;  // 4 B forward + 4 B backward per weight
  std::printf("=> %s: fake-quant fwd+bwd per step v2 %.3f ms (%.0f GB/s, %.1f%%), v1 %.3f ms (%.0f GB/s, %.1f%%), "
              "v1/v2 %.2fx\n",
              what, v2, bytes / (v2 * 1e-3) / 1e9, 100.0 * bytes / (v2 * 1e-3) / 1e9 / peak, v1,
              bytes / (v1 * 1e-3) / 1e9, 100.0 * bytes / (v1 * 1e-3) / 1e9 / peak, v1 / v2);
  std::printf("   (with the first v2 backward, OMNIQ_FQ_V2_OLD=1: %.3f ms, %.1f%%)\n", v2_old,
              100.0 * bytes / (v2_old * 1e-3) / 1e9 / peak);
}

// One LLaMA-2-7B block: q, k, v, o [4096x4096], gate, up [11008x4096], down [4096x11008].
void ab_section(int reps, double peak) {
  const int64_t C = 4096, F = 11008;
  const double weights = 4.0 * C * C + 3.0 * C * F;
  std::printf("fake-quant v2 (default) vs v1 (OMNIQ_FQ_V1=1), f16 w, bf16 ŵ/dŵ, LWC, W4:\n");
  for (int group : {128, 0}) {
    const AbPair p[3] = {ab_weight(C, C, group, reps, peak), ab_weight(F, C, group, reps, peak),
                         ab_weight(C, F, group, reps, peak)};
    const int count[3] = {4, 2, 1};
    sum_line(group ? "LLaMA-7B block W4A16 g128" : "LLaMA-7B block W4 per-channel (no LET)", p, count, 3, weights,
             peak);
  }
  // W4A4 with LET: q (cols, rows ÷ s_a), k (cols, rows · s_a), v (cols, rows ÷ s_out), o, gate, up
  // (cols); down_proj has no LET: the plain per-channel kernels.
  const AbPair p[5] = {ab_let(C, C, true, true, reps, peak), ab_let(C, C, true, false, reps, peak),
                       ab_let(C, C, false, false, reps, peak), ab_let(F, C, false, false, reps, peak),
                       ab_weight(C, F, 0, reps, peak)};
  const int count[5] = {2, 1, 1, 2, 1};
  sum_line("LLaMA-7B block W4A4 LET (per-channel)", p, count, 5, weights, peak);
}

}  // namespace

int main(int argc, char** argv) {
  double peak = 3350;
  int reps = 50;
  bool fq_only = false, ab_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--fake-quant-only")) fq_only = true;
    if (!std::strcmp(argv[i], "--ab-only")) ab_only = true;
    if (i + 1 >= argc) continue;
    if (!std::strcmp(argv[i], "--peak-gbs")) peak = std::atof(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[++i]);
  }
  if (!cuda_available()) {
    std::puts("bench_memory_ops: no CUDA device visible; nothing to measure");
    return 0;
  }
  Device g = Device::cuda();
  const int64_t T = 2048, C = 4096, F = 11008;
  std::printf("memory-bound ops, %s, peak %.0f GB/s\n", cuda_context(0).prop.name, peak);
  if (ab_only) {
    ab_section(reps, peak);
    return 0;
  }
  if (!fq_only) {
    Tensor x = Tensor::uniform({T, C}, -1, 1, 1, DType::bf16, g);
    Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 3, DType::f32, g);
    Tensor gate = Tensor::uniform({T, F}, -2, 2, 4, DType::bf16, g);
    Tensor up = Tensor::uniform({T, F}, -2, 2, 5, DType::bf16, g);
    const double e = 2;  // bytes per bf16
    {
      // 4× the activation rows: 2 × 64 MB bf16, so the working set is well beyond the 50 MB L2 and
      // the figure is HBM bandwidth (at [2048x4096] the 32 MB stayed in L2 between repetitions).
      const int64_t TA = 4 * T;
      Tensor xa = Tensor::uniform({TA, C}, -1, 1, 1, DType::bf16, g);
      Tensor ya = Tensor::uniform({TA, C}, -1, 1, 2, DType::bf16, g);
      report("add_inplace x += y        [8192x4096]", time_ms([&] { add_inplace(xa, ya); }, reps), 3 * TA * C * e,
             peak);
    }
    Tensor rstd;
    report("rmsnorm forward           [2048x4096]", time_ms([&] { rmsnorm_forward(x, w, 1e-5f, &rstd); }, reps),
           2 * T * C * e, peak);
    report("swiglu forward            [2048x11008]", time_ms([&] { swiglu_forward(gate, up); }, reps), 3 * T * F * e,
           peak);
    report("fake_quant_act 4-bit      [2048x4096]", time_ms([&] { fake_quant_act_forward(x, 4); }, reps), 2 * T * C * e,
           peak);
    Tensor wt = Tensor::uniform({C, F}, -0.05f, 0.05f, 6, DType::f32, g);
    Tensor gamma = Tensor::full({C * F / 128}, 4.0f, DType::f32, g);
    Tensor beta = Tensor::full({C * F / 128}, 4.0f, DType::f32, g);
    WeightQuantSpec spec{4, 128, false};
    report("fake_quant_weight+LWC f32->f32 [4096x11008] g128",
           time_ms([&] { fake_quant_weight_forward(wt, spec, &gamma, &beta); }, reps), 2 * C * F * 4.0, peak);
  }
  // The weight path of one OmniQuant training step (W4A16, LWC, bf16 compute).
  std::puts("weight fake-quant + LWC, f32 master weights, bf16 compute (W4):");
  bench_fake_quant("g128", C, F, 128, reps, peak);
  bench_fake_quant("per-chan", C, F, 0, reps, peak);
  bench_fake_quant("per-chan", F, C, 0, reps, peak);
  // A whole LLaMA-2-7B block per step: q, k, v, o [4096x4096], gate, up [11008x4096], down [4096x11008].
  for (int group : {128, 0}) {
    FqTimes sq = bench_fake_quant(group ? "g128" : "per-chan", C, C, group, reps, peak);
    FqTimes up_t = bench_fake_quant(group ? "g128" : "per-chan", F, C, group, reps, peak);
    FqTimes dn = bench_fake_quant(group ? "g128" : "per-chan", C, F, group, reps, peak);
    const double step = 4 * (sq.fwd_ms + sq.bwd_ms) + 2 * (up_t.fwd_ms + up_t.bwd_ms) + dn.fwd_ms + dn.bwd_ms;
    const double weights = 4.0 * C * C + 3.0 * C * F;
    std::printf("=> LLaMA-7B block, %s: fake-quant fwd+bwd %.3f ms per step (%.0f GB/s; target <= 0.8 ms)\n",
                group ? "g128" : "per-channel", step, weights * 14.0 / (step * 1e-3) / 1e9);
  }
  ab_section(reps, peak);
  return 0;
}
