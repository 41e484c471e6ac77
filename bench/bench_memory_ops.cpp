// Memory-bound ops on the GPU: time, achieved GB/s and % of the HBM peak (H100 SXM ≈ 3.35 TB/s;
// override with --peak-gbs). Shapes are LLaMA-2-7B activations/weights (2048 tokens × 4096) and
// the 4096 × 11008 weight of an MLP projection. Not a test.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include <cuda_runtime.h>

#include "ops/activation.h"
#include "ops/elementwise.h"
#include "ops/fake_quant.h"
#include "ops/norm.h"
#include "runtime/cuda_context.h"
#include "runtime/tensor.h"

using namespace omniq;

namespace {

double time_ms(const std::function<void()>& f, int reps) {
  cudaStream_t s = cuda_context(0).stream;
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a, s);
  for (int i = 0; i < reps; ++i) f();
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / reps;
}

void report(const char* name, double ms, double bytes, double peak_gbs) {
  double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-44s %8.3f ms  %8.1f GB/s  %5.1f%% of peak\n", name, ms, gbs, 100.0 * gbs / peak_gbs);
}

}  // namespace

int main(int argc, char** argv) {
  double peak = 3350;
  int reps = 50;
  for (int i = 1; i + 1 < argc; ++i) {
    if (!std::strcmp(argv[i], "--peak-gbs")) peak = std::atof(argv[++i]);
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[++i]);
  }
  if (!cuda_available()) {
    std::puts("bench_memory_ops: no CUDA device visible; nothing to measure");
    return 0;
  }
  Device g = Device::cuda();
  const int64_t T = 2048, C = 4096, F = 11008;
  Tensor x = Tensor::uniform({T, C}, -1, 1, 1, DType::bf16, g);
  Tensor y = Tensor::uniform({T, C}, -1, 1, 2, DType::bf16, g);
  Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 3, DType::f32, g);
  Tensor gate = Tensor::uniform({T, F}, -2, 2, 4, DType::bf16, g);
  Tensor up = Tensor::uniform({T, F}, -2, 2, 5, DType::bf16, g);
  Tensor wt = Tensor::uniform({C, F}, -0.05f, 0.05f, 6, DType::f32, g);
  Tensor gamma = Tensor::full({C * F / 128}, 4.0f, DType::f32, g);
  Tensor beta = Tensor::full({C * F / 128}, 4.0f, DType::f32, g);
  const double e = 2;  // bytes per bf16
  std::printf("memory-bound ops, %s, bf16 activations (2048 tokens)\n", cuda_context(0).prop.name);
  report("add_inplace x += y        [2048x4096]", time_ms([&] { add_inplace(x, y); }, reps), 3 * T * C * e, peak);
  Tensor rstd;
  report("rmsnorm forward           [2048x4096]", time_ms([&] { rmsnorm_forward(x, w, 1e-5f, &rstd); }, reps),
         2 * T * C * e, peak);
  report("swiglu forward            [2048x11008]", time_ms([&] { swiglu_forward(gate, up); }, reps), 3 * T * F * e, peak);
  report("fake_quant_act 4-bit      [2048x4096]", time_ms([&] { fake_quant_act_forward(x, 4); }, reps), 2 * T * C * e, peak);
  WeightQuantSpec spec{4, 128, false};
  report("fake_quant_weight+LWC f32 [4096x11008] g128",
         time_ms([&] { fake_quant_weight_forward(wt, spec, &gamma, &beta); }, reps), 2 * C * F * 4.0, peak);
  return 0;
}
