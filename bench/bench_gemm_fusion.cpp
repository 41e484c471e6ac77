// A/B micro-benchmark of the GEMM / epilogue fusions (autograd/functions.h, kFuse*) at LLaMA-7B
// training shapes, bf16 on CUDA: each fused op next to the unfused pair it replaces.
//
//   bench_gemm_fusion [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]
//
// Napkin math (T = 2048, C = 4096, bf16): a [T, C] tensor is 16 MiB. The unfused residual add reads
// two and writes one (48 MiB, ~15 us at ~3.3 TB/s); the fused GEMM instead reads C (16 MiB) in its
// epilogue. Same for the dX accumulation (add_inplace: 48 MiB vs one extra C read) and the norm dx
// (an extra 16 MiB read in the dx kernel). So each fusion should save ~10 us per use; if a fused
// line is slower than its "plain + add" line, the beta = 1 GEMM itself is the cost (compare with
// the "beta = 0" line; OMNIQ_GEMM_PLAN_LOG=1 prints the algorithm cuBLASLt picked for each plan).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench/bench_shape_options.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "runtime/device.h"
#include "runtime/tensor.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_context.h"
#include "bench/bench_timing.h"
#endif

namespace {

using Options = omniq::bench::ShapeOptions;

#ifdef OMNIQ_HAS_CUDA
// Mean microseconds per call of f on the omniq stream after the warmup (bench/bench_timing.h).
template <typename F>
double time_us(const Options& o, cudaStream_t stream, F&& f) {
  return 1000.0 * omniq::bench::time_ms(stream, o.warmup, o.reps, f);
}

void line(const char* name, double us) { std::printf("  %-48s %9.1f us\n", name, us); }

// Forward: y = r + a·Wᵀ as plain GEMM (beta 0), GEMM then add, and the residual epilogue (beta 1).
void bench_residual(const Options& o, omniq::Device dev, cudaStream_t s, const char* label, int64_t K) {
  using namespace omniq;
  const DType bf = DType::bf16;
  Tensor a = Tensor::uniform({o.T, K}, -1, 1, 1, bf, dev), w = Tensor::uniform({o.C, K}, -0.05f, 0.05f, 2, bf, dev);
  Tensor r = Tensor::uniform({o.T, o.C}, -1, 1, 3, bf, dev);
  std::printf("\n%s: [%lld, %lld] x [%lld, %lld]^T + residual\n", label, (long long)o.T, (long long)K, (long long)o.C,
              (long long)K);
  const double plain = time_us(o, s, [&] { Tensor y = linear_forward(a, w); });
  const double unfused = time_us(o, s, [&] { Tensor y = add(r, linear_forward(a, w)); });
  const double fused = time_us(o, s, [&] { Tensor y = linear_forward(a, w, nullptr, &r); });
  line("GEMM alone (beta 0)", plain);
  line("GEMM, then add (unfused)", unfused);
  line("GEMM with the residual in the epilogue (fused)", fused);
  std::printf("  => fused saves %.1f us per use; beta = 1 costs %.1f us over beta = 0\n", unfused - fused,
              fused - plain);
}

// Backward of a Linear input that already holds a gradient: dX = dY·W added into it.
void bench_dx(const Options& o, omniq::Device dev, cudaStream_t s) {
  using namespace omniq;
  const DType bf = DType::bf16;
  Tensor x = Tensor::uniform({o.T, o.C}, -1, 1, 4, bf, dev);
  Tensor w = Tensor::uniform({o.F, o.C}, -0.05f, 0.05f, 5, bf, dev);
  Tensor dy = Tensor::uniform({o.T, o.F}, -1e-3f, 1e-3f, 6, bf, dev);
  Tensor acc = Tensor::zeros({o.T, o.C}, bf, dev);
  std::printf("\ngate/up dX: [%lld, %lld] x [%lld, %lld] into an existing [%lld, %lld] gradient\n", (long long)o.T,
              (long long)o.F, (long long)o.F, (long long)o.C, (long long)o.T, (long long)o.C);
  const double plain = time_us(o, s, [&] { LinearGrads g = linear_backward(dy, x, w, true, false, false); });
  const double unfused = time_us(o, s, [&] {
    LinearGrads g = linear_backward(dy, x, w, true, false, false);
    add_inplace(acc, g.dx);
  });
  const double fused = time_us(o, s, [&] { linear_backward_dx_accumulate(dy, w, acc); });
  line("dX GEMM alone (beta 0)", plain);
  line("dX GEMM, then add_inplace (unfused)", unfused);
  line("dX GEMM accumulating, beta 1 in place (fused)", fused);
  std::printf("  => fused saves %.1f us per use; beta = 1 costs %.1f us over beta = 0\n", unfused - fused,
              fused - plain);
}

// RMSNorm backward dx into an existing gradient (the block's h).
void bench_norm(const Options& o, omniq::Device dev, cudaStream_t s) {
  using namespace omniq;
  const DType bf = DType::bf16;
  Tensor x = Tensor::uniform({o.T, o.C}, -2, 2, 7, bf, dev), dy = Tensor::uniform({o.T, o.C}, -1e-3f, 1e-3f, 8, bf, dev);
  Tensor w = Tensor::uniform({o.C}, 0.5f, 1.5f, 9, DType::f32, dev);
  Tensor rstd;
  Tensor y = rmsnorm_forward(x, w, 1e-5f, &rstd);
  Tensor acc = Tensor::zeros({o.T, o.C}, bf, dev);
  std::printf("\nrmsnorm backward dx (no dw): [%lld, %lld]\n", (long long)o.T, (long long)o.C);
  const double plain = time_us(o, s, [&] { NormGrads g = rmsnorm_backward(dy, x, w, rstd, true, false); });
  const double unfused = time_us(o, s, [&] {
    NormGrads g = rmsnorm_backward(dy, x, w, rstd, true, false);
    add_inplace(acc, g.dx);
  });
  const double fused = time_us(o, s, [&] { NormGrads g = rmsnorm_backward(dy, x, w, rstd, true, false, &acc); });
  line("dx kernel alone", plain);
  line("dx kernel, then add_inplace (unfused)", unfused);
  line("dx kernel adding into the gradient (fused)", fused);
  std::printf("  => fused saves %.1f us per use\n", unfused - fused);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const Options o = omniq::bench::parse_shape_options(argc, argv, 20);
  if (!omniq::cuda_available()) {
    std::printf("bench_gemm_fusion: no CUDA device visible (or omniq built without CUDA); nothing to time.\n");
    return 0;
  }
#ifdef OMNIQ_HAS_CUDA
  try {
    const omniq::Device dev = omniq::Device::cuda(0);
    omniq::CudaContext& ctx = omniq::cuda_context(dev);
    std::printf("bench_gemm_fusion on %s: T=%lld C=%lld F=%lld bf16, %d reps after %d warmup\n", ctx.prop.name,
                (long long)o.T, (long long)o.C, (long long)o.F, o.reps, o.warmup);
    bench_residual(o, dev, ctx.stream, "o_proj", o.C);
    bench_residual(o, dev, ctx.stream, "down_proj", o.F);
    bench_dx(o, dev, ctx.stream);
    bench_norm(o, dev, ctx.stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemm_fusion: %s\n", e.what());
    return 1;
  }
#endif
  return 0;
}
