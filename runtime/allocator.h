// Raw memory for tensors. Host memory is 64-byte aligned; CUDA memory comes from the device's
// stream-ordered pool (cudaMallocAsync on the device context's stream), so freeing a buffer whose
// kernels are still queued is safe and re-allocation is cheap.
#pragma once
#include <cstddef>
#include <cstdint>

#include "runtime/device.h"

namespace omniq {

void* device_alloc(Device dev, size_t bytes);
void device_free(Device dev, void* ptr, size_t bytes) noexcept;

// Byte counters of live allocations (what tensors hold now) and the peak since the last reset.
struct MemoryStats {
  int64_t live_bytes = 0;
  int64_t peak_bytes = 0;
};
MemoryStats memory_stats(Device dev);
void reset_peak_memory(Device dev);

}  // namespace omniq
