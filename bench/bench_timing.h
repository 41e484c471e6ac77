// The timing helper the CUDA benchmarks share: mean milliseconds per call of f, measured with CUDA
// events on the given stream (the omniq context stream every op runs on) after `warmup` untimed
// calls. Events time the device work of the `reps` calls back to back, not the host loop.
#pragma once
#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace omniq::bench {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(e));
  std::exit(1);
}

template <typename F>
double time_ms(cudaStream_t stream, int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int i = 0; i < reps; ++i) f();
  check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
  check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  check_cuda(cudaEventDestroy(start), "cudaEventDestroy");
  check_cuda(cudaEventDestroy(stop), "cudaEventDestroy");
  return ms / reps;
}

}  // namespace omniq::bench
#endif
