// Should the training step merge the GEMMs that share an input? LLaMA-7B block shapes, bf16 with
// fp32 accumulation on CUDA: the separate GEMMs of q/k/v (and gate/up) next to one strided-batched
// GEMM (the shared X at batch stride 0) and next to one GEMM over the concatenated weight.
//
//   bench_gemm_merge [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]
//
// Why it might pay: at T = 2048 a [T, 4096] x [4096, 4096]ᵀ GEMM is only ~256 output tiles of 128x256
// (under two waves on 132 SMs), 11008 columns are 5.2 waves: wave quantisation and per-launch ramp
// are a few % of each GEMM. Merging trades them for one larger problem.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench/bench_shape_options.h"
#include "ops/matmul.h"
#include "runtime/device.h"
#include "runtime/tensor.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include "bench/bench_timing.h"
#include "runtime/cuda_context.h"
#endif

namespace {

using Options = omniq::bench::ShapeOptions;

#ifdef OMNIQ_HAS_CUDA
using omniq::cuda::GemmArgs;

void line(const Options& o, const char* name, double ms, double flop) {
  const double tf = flop / (ms * 1e-3) / 1e12;
  std::printf("  %-52s %8.1f us %7.1f TFLOP/s %5.1f%%\n", name, 1000.0 * ms, tf, 100.0 * tf / o.peak);
}

GemmArgs base(int device) {
  GemmArgs g;
  g.device = device;
  g.ab_type = omniq::DType::bf16;
  g.c_type = omniq::DType::bf16;
  return g;
}

// Y_i[T, N] = X[T, K] · W_i[N, K]ᵀ for `n` weights: n GEMMs, one batched GEMM (X at stride 0),
// one GEMM over the stacked [n·N, K] weight into [T, n·N].
void forward(const Options& o, omniq::Device dev, cudaStream_t s, const char* label, int n, int64_t N, int64_t K) {
  using namespace omniq;
  Tensor x = Tensor::uniform({o.T, K}, -1, 1, 1, DType::bf16, dev);
  Tensor w = Tensor::uniform({n * N, K}, -0.05f, 0.05f, 2, DType::bf16, dev);
  Tensor y = Tensor::empty({n * o.T * N}, DType::bf16, dev);
  const double flop = 2.0 * n * o.T * N * K;
  std::printf("\n%s forward: %d x [%lld, %lld] x [%lld, %lld]^T\n", label, n, (long long)o.T, (long long)K,
              (long long)N, (long long)K);
  auto one = [&](int i, int64_t ldc, int64_t col0) {
    GemmArgs g = base(dev.index);
    g.trans_b = true, g.M = o.T, g.N = N, g.K = K;
    g.A = x.data(), g.lda = K;
    g.B = static_cast<const uint16_t*>(w.data()) + i * N * K, g.ldb = K;
    g.C = static_cast<uint16_t*>(y.data()) + (ldc == N ? i * o.T * N : col0), g.ldc = ldc;
    cuda::gemm(g);
  };
  line(o, "separate GEMMs", bench::time_ms(s, o.warmup, o.reps, [&] { for (int i = 0; i < n; ++i) one(i, N, 0); }), flop);
  line(o, "one batched GEMM (X at batch stride 0)", bench::time_ms(s, o.warmup, o.reps, [&] {
         GemmArgs g = base(dev.index);
         g.trans_b = true, g.M = o.T, g.N = N, g.K = K, g.batch = n;
         g.A = x.data(), g.lda = K, g.stride_a = 0;
         g.B = w.data(), g.ldb = K, g.stride_b = N * K;
         g.C = y.data(), g.ldc = N, g.stride_c = o.T * N;
         cuda::gemm(g);
       }), flop);
  line(o, "one GEMM over the stacked weight ([T, n*N] out)", bench::time_ms(s, o.warmup, o.reps, [&] {
         GemmArgs g = base(dev.index);
         g.trans_b = true, g.M = o.T, g.N = n * N, g.K = K;
         g.A = x.data(), g.lda = K;
         g.B = w.data(), g.ldb = K;
         g.C = y.data(), g.ldc = n * N;
         cuda::gemm(g);
       }), flop);
}

// dW_i[N, K] = dY_iᵀ · X: n GEMMs, one batched GEMM, one GEMM from a [T, n·N] dY.
void weight_grad(const Options& o, omniq::Device dev, cudaStream_t s, const char* label, int n, int64_t N, int64_t K) {
  using namespace omniq;
  Tensor x = Tensor::uniform({o.T, K}, -1, 1, 1, DType::bf16, dev);
  Tensor dy = Tensor::uniform({n * o.T * N}, -1, 1, 3, DType::bf16, dev);
  Tensor dw = Tensor::empty({n * N, K}, DType::bf16, dev);
  const double flop = 2.0 * n * o.T * N * K;
  std::printf("\n%s weight gradient: %d x [%lld, %lld]^T x [%lld, %lld]\n", label, n, (long long)o.T, (long long)N,
              (long long)o.T, (long long)K);
  line(o, "separate GEMMs", bench::time_ms(s, o.warmup, o.reps, [&] {
         for (int i = 0; i < n; ++i) {
           GemmArgs g = base(dev.index);
           g.trans_a = true, g.M = N, g.N = K, g.K = o.T;
           g.A = static_cast<const uint16_t*>(dy.data()) + i * o.T * N, g.lda = N;
           g.B = x.data(), g.ldb = K;
           g.C = static_cast<uint16_t*>(dw.data()) + i * N * K, g.ldc = K;
           cuda::gemm(g);
         }
       }), flop);
  line(o, "one batched GEMM (X at batch stride 0)", bench::time_ms(s, o.warmup, o.reps, [&] {
         GemmArgs g = base(dev.index);
         g.trans_a = true, g.M = N, g.N = K, g.K = o.T, g.batch = n;
         g.A = dy.data(), g.lda = N, g.stride_a = o.T * N;
         g.B = x.data(), g.ldb = K, g.stride_b = 0;
         g.C = dw.data(), g.ldc = K, g.stride_c = N * K;
         cuda::gemm(g);
       }), flop);
  line(o, "one GEMM from [T, n*N] dY", bench::time_ms(s, o.warmup, o.reps, [&] {
         GemmArgs g = base(dev.index);
         g.trans_a = true, g.M = n * N, g.N = K, g.K = o.T;
         g.A = dy.data(), g.lda = n * N;
         g.B = x.data(), g.ldb = K;
         g.C = dw.data(), g.ldc = K;
         cuda::gemm(g);
       }), flop);
}

// dX[T, K] = Σ_i dY_i · W_i: the first GEMM then β = 1 accumulation, vs one GEMM over K' = n·N.
void input_grad(const Options& o, omniq::Device dev, cudaStream_t s, const char* label, int n, int64_t N, int64_t K) {
  using namespace omniq;
  Tensor w = Tensor::uniform({n * N, K}, -0.05f, 0.05f, 2, DType::bf16, dev);
  Tensor dy = Tensor::uniform({o.T, n * N}, -1, 1, 3, DType::bf16, dev);
  Tensor dx = Tensor::empty({o.T, K}, DType::bf16, dev);
  const double flop = 2.0 * n * o.T * N * K;
  std::printf("\n%s input gradient: sum of %d x [%lld, %lld] x [%lld, %lld]\n", label, n, (long long)o.T, (long long)N,
              (long long)N, (long long)K);
  line(o, "separate GEMMs (beta = 1 after the first)", bench::time_ms(s, o.warmup, o.reps, [&] {
         for (int i = 0; i < n; ++i) {
           GemmArgs g = base(dev.index);
           g.M = o.T, g.N = K, g.K = N, g.beta = i == 0 ? 0.f : 1.f;
           g.A = static_cast<const uint16_t*>(dy.data()) + i * N, g.lda = n * N;
           g.B = static_cast<const uint16_t*>(w.data()) + i * N * K, g.ldb = K;
           g.C = dx.data(), g.ldc = K;
           cuda::gemm(g);
         }
       }), flop);
  line(o, "one GEMM over K = n*N", bench::time_ms(s, o.warmup, o.reps, [&] {
         GemmArgs g = base(dev.index);
         g.M = o.T, g.N = K, g.K = n * N;
         g.A = dy.data(), g.lda = n * N;
         g.B = w.data(), g.ldb = K;
         g.C = dx.data(), g.ldc = K;
         cuda::gemm(g);
       }), flop);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const Options o = omniq::bench::parse_shape_options(argc, argv, 10);
  if (!omniq::cuda_available()) {
    std::printf("bench_gemm_merge: no CUDA device visible (or omniq built without CUDA); nothing to time.\n");
    return 0;
  }
#ifdef OMNIQ_HAS_CUDA
  try {
    const omniq::Device dev = omniq::Device::cuda(0);
    omniq::CudaContext& ctx = omniq::cuda_context(dev);
    std::printf("bench_gemm_merge on %s, T=%lld C=%lld F=%lld, %d reps after %d warmup\n", ctx.prop.name,
                (long long)o.T, (long long)o.C, (long long)o.F, o.reps, o.warmup);
    forward(o, dev, ctx.stream, "q/k/v", 3, o.C, o.C);
    weight_grad(o, dev, ctx.stream, "q/k/v", 3, o.C, o.C);
    forward(o, dev, ctx.stream, "gate/up", 2, o.F, o.C);
    weight_grad(o, dev, ctx.stream, "gate/up", 2, o.F, o.C);
    input_grad(o, dev, ctx.stream, "gate/up", 2, o.F, o.C);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemm_merge failed: %s\n", e.what());
    return 1;
  }
#endif
  return 0;
}
