// One context per CUDA device: the stream all omniq work is queued on, the cuBLASLt handle and
// its workspace, and the stream-ordered memory pool. Created lazily, lives for the process.
// Include only from CUDA-enabled translation units.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#include "runtime/device.h"

namespace omniq {

struct CudaContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;  // cuBLASLt scratch (heuristics pick algorithms that fit in it)
  size_t workspace_bytes = 0;
  cudaMemPool_t pool = nullptr;
  cudaDeviceProp prop{};
};

// The context of device `index` (makes it current on the calling thread).
CudaContext& cuda_context(int index);
inline CudaContext& cuda_context(Device dev) { return cuda_context(dev.index); }

// Grid size for a 1-D elementwise launch over n items.
inline unsigned int grid_for(int64_t n, int block) {
  int64_t g = (n + block - 1) / block;
  return static_cast<unsigned int>(g < 1 ? 1 : (g > 2147483647 ? 2147483647 : g));
}

}  // namespace omniq
