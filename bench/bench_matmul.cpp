// Benchmark of the GEMM ops on CUDA: linear_forward at LLaMA-2-7B shapes (2048 tokens) and 8192³ in
// bf16, and attention forward+backward at B=1, T=2048, D=128 with H=32 (7B) and H=64/Hkv=8 (70B GQA).
// Prints ms, TFLOP/s and % of peak.
//
//   bench_matmul [--peak TFLOPS] [--reps N] [--warmup N]
//
// Peak defaults to the H100 SXM dense bf16 figure (989 TFLOP/s). Napkin math: a 2048x4096x4096 GEMM
// is 68.7 GFLOP, ~70 us at peak; the weight read (32 MiB bf16) takes ~10 us at 3.35 TB/s, so these
// shapes are compute-bound and a good cuBLASLt algorithm should reach 60-80% of peak.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "ops/attention.h"
#include "ops/matmul.h"
#include "runtime/allocator.h"
#include "runtime/device.h"
#include "runtime/tensor.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#include "runtime/cuda_context.h"
#include "bench/bench_timing.h"
#endif

namespace {

struct Options {
  double peak_tflops = 989.0;
  int reps = 20;
  int warmup = 5;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--peak") o.peak_tflops = std::atof(next());
    else if (a == "--reps") o.reps = std::atoi(next());
    else if (a == "--warmup") o.warmup = std::atoi(next());
    else {
      std::fprintf(stderr, "usage: %s [--peak TFLOPS] [--reps N] [--warmup N]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.reps < 20) o.reps = 20;  // fewer samples make the mean too noisy to compare runs
  if (o.peak_tflops <= 0) o.peak_tflops = 989.0;
  return o;
}

#ifdef OMNIQ_HAS_CUDA
// Mean milliseconds per call of f on the omniq stream after the warmup (bench/bench_timing.h).
template <typename F>
double time_ms(const Options& o, cudaStream_t stream, F&& f) {
  return omniq::bench::time_ms(stream, o.warmup, o.reps, f);
}

void report(const char* name, double ms, double flop, const Options& o) {
  const double tflops = flop / (ms * 1e-3) / 1e12;
  std::printf("%-44s %9.3f ms  %8.1f TFLOP/s  %5.1f%% of peak\n", name, ms, tflops, 100.0 * tflops / o.peak_tflops);
}

void bench_linear(const Options& o, omniq::Device dev, cudaStream_t stream) {
  using namespace omniq;
  struct Case {
    const char* name;
    int64_t M, K, N;
  };
  const Case cases[] = {
      {"q/k/v/o_proj  2048 x 4096 -> 4096", 2048, 4096, 4096},
      {"gate/up_proj  2048 x 4096 -> 11008", 2048, 4096, 11008},
      {"down_proj     2048 x 11008 -> 4096", 2048, 11008, 4096},
      {"square        8192 x 8192 -> 8192", 8192, 8192, 8192},
  };
  std::printf("\nlinear_forward, bf16, fp32 accumulation (Y = X·Wᵀ)\n");
  for (const Case& c : cases) {
    Tensor x = Tensor::uniform(Shape{c.M, c.K}, -1, 1, 1, DType::bf16, dev);
    Tensor w = Tensor::uniform(Shape{c.N, c.K}, -1, 1, 2, DType::bf16, dev);
    const double ms = time_ms(o, stream, [&]() { Tensor y = linear_forward(x, w); });
    report(c.name, ms, 2.0 * c.M * c.N * c.K, o);
  }
}

// Causal bf16 attention forward+backward at one LLaMA shape. FLOPs counted are the causally useful
// ones (half of the full T² matrices): forward 2 GEMMs (Q·Kᵀ, P·V), backward 5 (Q·Kᵀ again, dO·Vᵀ,
// Pᵀ·dO, dS·K, dSᵀ·Q), 2·T²·D each per query head, halved. bf16/f16 with D ∈ {64, 128} runs the
// flash kernels (ops/cuda/flash_attention.cu, O(T) scratch); other cases the materialised path.
void bench_attention(const Options& o, omniq::Device dev, cudaStream_t stream, const char* label, int64_t H,
                     int64_t Hkv) {
  using namespace omniq;
  const int64_t B = 1, T = 2048, D = 128;
  const float scale = 1.0f / 11.3137085f;  // 1/sqrt(128)
  Tensor q = Tensor::uniform(Shape{B, T, H, D}, -1, 1, 3, DType::bf16, dev);
  Tensor k = Tensor::uniform(Shape{B, T, Hkv, D}, -1, 1, 4, DType::bf16, dev);
  Tensor v = Tensor::uniform(Shape{B, T, Hkv, D}, -1, 1, 5, DType::bf16, dev);
  Tensor dout = Tensor::uniform(Shape{B, T, H, D}, -1, 1, 6, DType::bf16, dev);
  Tensor lse;
  Tensor out = attention_forward(q, k, v, scale, true, &lse);
  reset_peak_memory(dev);
  const int64_t live0 = memory_stats(dev).live_bytes;

  const double gemm = 0.5 * 2.0 * B * H * T * T * D;  // one causal T x T x D product over all heads
  std::printf("\nattention %s, bf16, causal, B=%lld T=%lld H=%lld Hkv=%lld D=%lld (causal-useful FLOPs)\n", label,
              (long long)B, (long long)T, (long long)H, (long long)Hkv, (long long)D);
  // The flash forward kernels (v1; v2 128-query CTAs, OMNIQ_FLASH_FWD_V2=1; v3 wgmma where the build
  // and GPU have it, OMNIQ_FLASH_FWD_V3=1); the total below uses the process-wide one.
  const int fvariant0 = cuda::flash_forward_variant();
  double fwd = 0, fwd_v[4] = {0, 0, 0, 0};
  for (int variant : {3, 2, 1}) {
    if (variant == 3 && !cuda::flash_forward_v3_available(q)) continue;
    cuda::set_flash_forward_variant(variant);
    fwd_v[variant] = time_ms(o, stream, [&]() { Tensor l; Tensor y = attention_forward(q, k, v, scale, true, &l); });
    char name[64];
    std::snprintf(name, sizeof(name), "attention_forward v%d", variant);
    report(name, fwd_v[variant], 2 * gemm, o);
    if (variant == fvariant0) fwd = fwd_v[variant];
  }
  cuda::set_flash_forward_variant(fvariant0);
  std::printf("v2 vs v1 forward time: %.2fx faster\n", fwd_v[1] / fwd_v[2]);
  if (fwd_v[3] > 0) std::printf("v3 vs v1 forward time: %.2fx faster\n", fwd_v[1] / fwd_v[3]);
  // Both backward modes (ops/attention.h: ordered fp32 adds vs fp32 atomics) and both flash
  // backward kernels (ops/cuda/flash_attention.h: v2 128-key CTAs, the default; v1 64-key CTAs,
  // OMNIQ_FLASH_BWD_V1=1) for the A/B; times include attn_delta_kernel and the dQ/dK/dV
  // conversions. The total below uses the process-wide mode and variant.
  const bool mode0 = attention_deterministic();
  const int variant0 = cuda::flash_backward_variant();
  double bwd = 0, bwd_mode[4][2] = {{0, 0}, {0, 0}, {0, 0}, {0, 0}};
  const bool have_v3 = cuda::flash_backward_v3_available(q);  // wgmma (OMNIQ_FLASH_BWD_V3=1)
  for (int variant : {3, 2, 1}) {
    if (variant == 3 && !have_v3) continue;
    cuda::set_flash_backward_variant(variant);
    for (bool det : {true, false}) {
      set_attention_deterministic(det);
      bwd_mode[variant][det] = time_ms(o, stream, [&]() {
        AttentionGrads g = attention_backward(dout, q, k, v, out, lse, scale, true);
      });
      char name[64];
      std::snprintf(name, sizeof(name), "attention_backward v%d (%s)", variant, det ? "deterministic" : "atomic");
      report(name, bwd_mode[variant][det], 5 * gemm, o);
      if (det == mode0 && variant == variant0) bwd = bwd_mode[variant][det];
    }
  }
  cuda::set_flash_backward_variant(variant0);
  set_attention_deterministic(mode0);
  for (int variant : {3, 2, 1})
    if (bwd_mode[variant][0] > 0)
      std::printf("v%d: deterministic backward costs %+.1f%% over atomic\n", variant,
                100.0 * (bwd_mode[variant][1] / bwd_mode[variant][0] - 1.0));
  std::printf("v2 vs v1 backward time: deterministic %.2fx, atomic %.2fx faster\n", bwd_mode[1][1] / bwd_mode[2][1],
              bwd_mode[1][0] / bwd_mode[2][0]);
  if (have_v3)
    std::printf("v3 vs v2 backward time: deterministic %.2fx, atomic %.2fx faster\n", bwd_mode[2][1] / bwd_mode[3][1],
                bwd_mode[2][0] / bwd_mode[3][0]);
  report("attention forward+backward", fwd + bwd, 7 * gemm, o);
  const MemoryStats ms = memory_stats(dev);
  std::printf("scratch peak above inputs: %.1f MiB (outputs + lse/delta + fp32 dQ accumulator when flash)\n",
              (ms.peak_bytes - live0) / 1048576.0);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (!omniq::cuda_available()) {
    std::printf("bench_matmul: no CUDA device visible (or omniq built without CUDA); nothing to time.\n");
    return 0;
  }
#ifdef OMNIQ_HAS_CUDA
  try {
    const omniq::Device dev = omniq::Device::cuda(0);
    omniq::CudaContext& ctx = omniq::cuda_context(dev);
    std::printf("bench_matmul on %s, peak %.0f TFLOP/s (--peak), %d reps after %d warmup\n", ctx.prop.name,
                o.peak_tflops, o.reps, o.warmup);
    bench_linear(o, dev, ctx.stream);
    bench_attention(o, dev, ctx.stream, "LLaMA-2-7B MHA", 32, 32);
    bench_attention(o, dev, ctx.stream, "LLaMA-2-70B GQA", 64, 8);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_matmul failed: %s\n", e.what());
    return 1;
  }
#endif
  return 0;
}
