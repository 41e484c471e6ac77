// CUDA_CHECK / CUBLAS_CHECK / NCCL_CHECK: turn a failed status into omniq::Error with file:line.
// Include only from CUDA-enabled translation units.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "runtime/error.h"

namespace omniq {
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);
}  // namespace omniq

#define CUDA_CHECK(expr)                                                          \
  do {                                                                            \
    cudaError_t _omniq_err = (expr);                                              \
    if (_omniq_err != cudaSuccess) ::omniq::throw_cuda_error(_omniq_err, #expr, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(expr)                                                        \
  do {                                                                            \
    cublasStatus_t _omniq_st = (expr);                                            \
    if (_omniq_st != CUBLAS_STATUS_SUCCESS) ::omniq::throw_cublas_error(_omniq_st, #expr, __FILE__, __LINE__); \
  } while (0)

// Every kernel launch is followed by this: catches bad launch configurations at the call site.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define NCCL_CHECK(expr)                                                          \
  do {                                                                            \
    ncclResult_t _omniq_nr = (expr);                                              \
    if (_omniq_nr != ncclSuccess)                                                 \
      ::omniq::throw_error(__FILE__, __LINE__,                                    \
                           ::omniq::strformat("NCCL call %s failed: %s", #expr, ncclGetErrorString(_omniq_nr))); \
  } while (0)
