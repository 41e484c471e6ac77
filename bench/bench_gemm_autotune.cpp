// The 18 GEMMs of a LLaMA-7B weight-only training step (7 forward, 4 dX, 7 dW; bf16, fp32
// accumulation), each timed with the heuristic's first algorithm and with the autotuned one
// (ops/cuda/gemm_autotune.h), through the same ops the step calls (linear_forward with and without the
// residual epilogue, linear_backward, linear_backward_dx_accumulate).
//
//   bench_gemm_autotune [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]
//
// OMNIQ_GEMM_PLAN_LOG=1 prints every candidate the autotuner timed and whether its bits matched.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "ops/matmul.h"
#include "runtime/device.h"
#include "runtime/tensor.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include "bench/bench_timing.h"
#include "ops/cuda/gemm_autotune.h"
#include "runtime/cuda_context.h"
#endif

namespace {

struct Options {
  int64_t T = 2048, C = 4096, F = 11008;
  int reps = 30, warmup = 3;
  double peak = 989.0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "usage: %s [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]\n",
                   argv[0]);
      std::exit(2);
    }
    const char* v = argv[++i];
    if (a == "--tokens") o.T = std::atoll(v);
    else if (a == "--hidden") o.C = std::atoll(v);
    else if (a == "--mlp") o.F = std::atoll(v);
    else if (a == "--reps") o.reps = std::atoi(v);
    else if (a == "--warmup") o.warmup = std::atoi(v);
    else if (a == "--peak") o.peak = std::atof(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      std::exit(2);
    }
  }
  if (o.reps < 5) o.reps = 5;
  return o;
}

#ifdef OMNIQ_HAS_CUDA
struct Case {
  std::string name;
  int count;     // how many of this GEMM one step runs
  double flop;   // per GEMM
  std::function<void()> run;
};
#endif

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (!omniq::cuda_available()) {
    std::printf("bench_gemm_autotune: no CUDA device visible (or omniq built without CUDA); nothing to time.\n");
    return 0;
  }
#ifdef OMNIQ_HAS_CUDA
  try {
    using namespace omniq;
    const Device dev = Device::cuda(0);
    CudaContext& ctx = cuda_context(dev);
    const DType bf = DType::bf16;
    const int64_t T = o.T, C = o.C, F = o.F;
    std::printf("bench_gemm_autotune on %s, T=%lld C=%lld F=%lld, %d reps after %d warmup\n", ctx.prop.name,
                (long long)T, (long long)C, (long long)F, o.reps, o.warmup);
    Tensor x = Tensor::uniform({T, C}, -1, 1, 1, bf, dev), h = Tensor::uniform({T, F}, -1, 1, 2, bf, dev);
    Tensor wc = Tensor::uniform({C, C}, -0.05f, 0.05f, 3, bf, dev), wf = Tensor::uniform({F, C}, -0.05f, 0.05f, 4, bf, dev);
    Tensor wd = Tensor::uniform({C, F}, -0.05f, 0.05f, 5, bf, dev);
    Tensor r = Tensor::uniform({T, C}, -1, 1, 6, bf, dev), dyc = Tensor::uniform({T, C}, -1, 1, 7, bf, dev);
    Tensor dyf = Tensor::uniform({T, F}, -1, 1, 8, bf, dev), acc = Tensor::uniform({T, C}, -1, 1, 9, bf, dev);
    const double cc = 2.0 * T * C * C, cf = 2.0 * T * C * F;
    std::vector<Case> cases = {
        {"fwd q/k/v        [T,C]x[C,C]^T", 3, cc, [&] { Tensor y = linear_forward(x, wc); }},
        {"fwd o + residual [T,C]x[C,C]^T + r", 1, cc, [&] { Tensor y = linear_forward(x, wc, nullptr, &r); }},
        {"fwd gate/up      [T,C]x[F,C]^T", 2, cf, [&] { Tensor y = linear_forward(x, wf); }},
        {"fwd down + res.  [T,F]x[C,F]^T + r", 1, cf, [&] { Tensor y = linear_forward(h, wd, nullptr, &r); }},
        {"dX down          [T,C]x[C,F]", 1, cf, [&] { LinearGrads g = linear_backward(dyc, h, wd, true, false, false); }},
        {"dX gate          [T,F]x[F,C]", 1, cf, [&] { LinearGrads g = linear_backward(dyf, x, wf, true, false, false); }},
        {"dX up (+= acc.)  [T,F]x[F,C]", 1, cf, [&] { linear_backward_dx_accumulate(dyf, wf, acc); }},
        {"dX o             [T,C]x[C,C]", 1, cc, [&] { LinearGrads g = linear_backward(dyc, x, wc, true, false, false); }},
        {"dW down (bf16)   [T,C]^T x [T,F]", 1, cf,
         [&] { LinearGrads g = linear_backward(dyc, h, wd, false, true, false, bf); }},
        {"dW gate/up       [T,F]^T x [T,C]", 2, cf,
         [&] { LinearGrads g = linear_backward(dyf, x, wf, false, true, false, bf); }},
        {"dW o/q/k/v       [T,C]^T x [T,C]", 4, cc,
         [&] { LinearGrads g = linear_backward(dyc, x, wc, false, true, false, bf); }},
    };
    double step_off = 0, step_on = 0, step_flop = 0;
    std::printf("\n%-36s %5s %12s %12s %9s %16s\n", "GEMM", "count", "heuristic us", "autotuned us", "speed-up",
                "autotuned TFLOP/s");
    for (const Case& c : cases) {
      cuda::set_gemm_autotune(false);
      const double off = 1000.0 * bench::time_ms(ctx.stream, o.warmup, o.reps, c.run);
      cuda::set_gemm_autotune(true);  // a new plan (the switch is part of the plan key): tuned on first call
      const double on = 1000.0 * bench::time_ms(ctx.stream, o.warmup, o.reps, c.run);
      const double tf = c.flop / (on * 1e-6) / 1e12;
      std::printf("%-36s %5d %12.1f %12.1f %8.3fx %9.1f (%4.1f%%)\n", c.name.c_str(), c.count, off, on, off / on, tf,
                  100.0 * tf / o.peak);
      step_off += c.count * off, step_on += c.count * on, step_flop += c.count * c.flop;
    }
    std::printf("\none step's 18 GEMMs: heuristic %.1f us (%.1f TFLOP/s), autotuned %.1f us (%.1f TFLOP/s): %.1f us "
                "saved (%.1f%%)\n",
                step_off, step_flop / (step_off * 1e-6) / 1e12, step_on, step_flop / (step_on * 1e-6) / 1e12,
                step_off - step_on, 100.0 * (step_off - step_on) / step_off);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemm_autotune failed: %s\n", e.what());
    return 1;
  }
#endif
  return 0;
}
