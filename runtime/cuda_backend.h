// Host-callable CUDA runtime services with no CUDA types in the interface, so plain C++ files
// (tensor.cpp, allocator.cpp) can use them. Implemented in cuda_backend.cu; present only when
// OMNIQ_HAS_CUDA is defined. All work is queued on the device context's stream.
#pragma once
#include <cstddef>
#include <cstdint>

#include "runtime/dtype.h"

namespace omniq::cuda_rt {

int device_count() noexcept;  // 0 when no driver/GPU is present
void* malloc_async(int dev, size_t bytes);
void free_async(int dev, void* ptr) noexcept;
void memcpy_h2d(int dev, void* dst, const void* src, size_t bytes);  // returns when src may be reused
void memcpy_d2h(int dev, void* dst, const void* src, size_t bytes);  // synchronous
void memcpy_d2d(int dev, void* dst, const void* src, size_t bytes);  // stream-ordered
void convert(int dev, const void* src, DType src_dt, void* dst, DType dst_dt, int64_t n);
void fill(int dev, void* dst, DType dt, int64_t n, float value);
void synchronize(int dev);
// Waits for the stream, then returns the pool's unused cached memory to the driver.
void trim_pool(int dev);

}  // namespace omniq::cuda_rt
