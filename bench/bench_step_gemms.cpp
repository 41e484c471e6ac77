// The GEMM floor of one LLaMA block training step: only the 18 GEMMs the W4A16 LWC step runs (7
// forward, 4 dX, 7 dW; no dX for q/k/v, whose input is calibration data), through the same ops the
// step calls (linear_forward with the residual epilogue, linear_backward with a bf16 dŴ,
// linear_backward_dx_accumulate), back to back for as many steps as a real block trains.
//
//   bench_step_gemms [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]
//
// Why: the step's speed-up over a PyTorch step is bounded by step time / GEMM time, and under a
// sustained load the H100 hits its board power limit, so the GEMMs run at the clock the power cap
// allows, not at the boost clock a one-kernel profile sees. This times them under that load (default
// 2560 reps = 128 samples x 20 epochs, one block) and prints the clock the GPU held meanwhile, next to
// a short burst from a cooled-down GPU.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "bench/bench_shape_options.h"
#include "ops/matmul.h"
#include "runtime/device.h"
#include "runtime/gpu_monitor.h"
#include "runtime/tensor.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include "bench/bench_timing.h"
#include "runtime/cuda_context.h"
#endif

namespace {

using Options = omniq::bench::ShapeOptions;

#ifdef OMNIQ_HAS_CUDA
// The step's operands, bf16 (values do not change GEMM timing; magnitudes as a trained block's).
struct StepTensors {
  omniq::Tensor xn1, xn2, attn, h, res;          // activations [T, C] / [T, F]
  omniq::Tensor wq, wk, wv, wo, wg, wu, wd;     // fake-quantized weights ŵ
  omniq::Tensor d_c, d_f1, d_f2, dxn2;          // upstream gradients and the accumulated dX
};

StepTensors make_step(const Options& o, omniq::Device dev) {
  using omniq::Tensor;
  const omniq::DType bf = omniq::DType::bf16;
  auto act = [&](int64_t n, uint64_t seed) { return Tensor::uniform({o.T, n}, -1, 1, seed, bf, dev); };
  auto wt = [&](int64_t n, int64_t k, uint64_t seed) { return Tensor::uniform({n, k}, -0.05f, 0.05f, seed, bf, dev); };
  auto grad = [&](int64_t n, uint64_t seed) { return Tensor::uniform({o.T, n}, -1e-3f, 1e-3f, seed, bf, dev); };
  StepTensors s{act(o.C, 1), act(o.C, 2), act(o.C, 3), act(o.F, 4), act(o.C, 5),
                wt(o.C, o.C, 6), wt(o.C, o.C, 7), wt(o.C, o.C, 8), wt(o.C, o.C, 9),
                wt(o.F, o.C, 10), wt(o.F, o.C, 11), wt(o.C, o.F, 12),
                grad(o.C, 13), grad(o.F, 14), grad(o.F, 15), Tensor::zeros({o.T, o.C}, bf, dev)};
  return s;
}

// One step's GEMMs in the step's order: forward q, k, v, o (+ residual), gate, up, down (+ residual);
// backward down (dX, dW), gate/up (dW each, dX accumulated into one buffer), o (dX, dW), q/k/v (dW).
void step_gemms(StepTensors& s) {
  using namespace omniq;
  const DType bf = DType::bf16;
  Tensor q = linear_forward(s.xn1, s.wq), k = linear_forward(s.xn1, s.wk), v = linear_forward(s.xn1, s.wv);
  Tensor h1 = linear_forward(s.attn, s.wo, nullptr, &s.res);
  Tensor g = linear_forward(s.xn2, s.wg), u = linear_forward(s.xn2, s.wu);
  Tensor out = linear_forward(s.h, s.wd, nullptr, &h1);
  LinearGrads gd = linear_backward(s.d_c, s.h, s.wd, true, true, false, bf);
  LinearGrads gu = linear_backward(s.d_f1, s.xn2, s.wu, false, true, false, bf);
  LinearGrads gg = linear_backward(s.d_f2, s.xn2, s.wg, false, true, false, bf);
  linear_backward_dx_accumulate(s.d_f1, s.wu, s.dxn2);
  linear_backward_dx_accumulate(s.d_f2, s.wg, s.dxn2);
  LinearGrads go = linear_backward(s.d_c, s.attn, s.wo, true, true, false, bf);
  for (const Tensor* w : {&s.wq, &s.wk, &s.wv}) {
    LinearGrads gw = linear_backward(s.d_c, s.xn1, *w, false, true, false, bf);
  }
}

void report(const Options& o, const char* label, int reps, double ms, const omniq::GpuMonitorStats& st) {
  const double flop = 2.0 * o.T * (9.0 * o.C * o.C + 9.0 * o.C * o.F);
  const double tf = flop / (ms * 1e-3) / 1e12;
  std::printf("%-34s %5d steps: %.3f ms/step, %.1f TFLOP/s, %.1f%% of %.0f\n    %s\n", label, reps, ms, tf,
              100.0 * tf / o.peak, o.peak, omniq::GpuMonitor::describe(st).c_str());
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options o = omniq::bench::parse_shape_options(argc, argv, 20);
  bool reps_given = false;
  for (int i = 1; i < argc; ++i) reps_given |= std::string(argv[i]) == "--reps";
  if (!reps_given) o.reps = 2560;
  if (!omniq::cuda_available()) {
    std::printf("bench_step_gemms: no CUDA device visible (or omniq built without CUDA); nothing to time.\n");
    return 0;
  }
#ifdef OMNIQ_HAS_CUDA
  try {
    const omniq::Device dev = omniq::Device::cuda(0);
    omniq::CudaContext& ctx = omniq::cuda_context(dev);
    std::printf("bench_step_gemms on %s: the 18 GEMMs of one W4A16 LWC step, T=%lld C=%lld F=%lld bf16, "
                "%.3f TFLOP per step\n",
                ctx.prop.name, (long long)o.T, (long long)o.C, (long long)o.F,
                2.0 * o.T * (9.0 * o.C * o.C + 9.0 * o.C * o.F) / 1e12);
    StepTensors s = make_step(o, dev);
    for (int i = 0; i < o.warmup; ++i) step_gemms(s);  // plans, allocator, heuristics
    omniq::bench::check_cuda(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
    // A short burst after a pause: what a profiler or a few-step benchmark sees.
    std::this_thread::sleep_for(std::chrono::seconds(3));
    {
      omniq::GpuMonitor mon(dev, 5);
      const double ms = omniq::bench::time_ms(ctx.stream, 0, 10, [&] { step_gemms(s); });
      report(o, "burst (after 3 s idle)", 10, ms, mon.stop());
    }
    {
      omniq::GpuMonitor mon(dev, 50);
      const double ms = omniq::bench::time_ms(ctx.stream, 0, o.reps, [&] { step_gemms(s); });
      report(o, "sustained", o.reps, ms, mon.stop());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step_gemms failed: %s\n", e.what());
    return 1;
  }
#endif
  return 0;
}
