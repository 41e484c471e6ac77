#include "runtime/allocator.h"

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_backend.h"
#endif

namespace omniq {
namespace {

constexpr int kMaxCudaDevices = 16;

struct Counters {
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> peak{0};
  void add(int64_t bytes) {
    int64_t now = live.fetch_add(bytes) + bytes;
    int64_t prev = peak.load();
    while (now > prev && !peak.compare_exchange_weak(prev, now)) {
    }
  }
  void sub(int64_t bytes) { live.fetch_sub(bytes); }
};

Counters& counters(Device dev) {
  static Counters host;
  static Counters cuda[kMaxCudaDevices];
  if (dev.is_cpu()) return host;
  OMNIQ_CHECK(dev.index >= 0 && dev.index < kMaxCudaDevices, "CUDA device index %d out of range", dev.index);
  return cuda[dev.index];
}

}  // namespace

void* device_alloc(Device dev, size_t bytes) {
  if (bytes == 0) bytes = 1;  // keep pointers distinct and non-null
  void* p = nullptr;
  if (dev.is_cpu()) {
    size_t rounded = (bytes + 63) / 64 * 64;
    p = std::aligned_alloc(64, rounded);
    OMNIQ_CHECK(p != nullptr, "out of memory: could not allocate %zu bytes of host memory", bytes);
  } else {
#ifdef OMNIQ_HAS_CUDA
    p = cuda_rt::malloc_async(dev.index, bytes);
#else
    OMNIQ_FAIL("this omniq was built without CUDA (OMNIQ_CUDA=OFF): use --device cpu or rebuild with nvcc");
#endif
  }
  counters(dev).add(static_cast<int64_t>(bytes));
  return p;
}

void device_free(Device dev, void* ptr, size_t bytes) noexcept {
  if (!ptr) return;
  if (bytes == 0) bytes = 1;
  if (dev.is_cpu()) {
    std::free(ptr);
  } else {
#ifdef OMNIQ_HAS_CUDA
    cuda_rt::free_async(dev.index, ptr);
#endif
  }
  counters(dev).sub(static_cast<int64_t>(bytes));
}

MemoryStats memory_stats(Device dev) {
  Counters& c = counters(dev);
  return MemoryStats{c.live.load(), c.peak.load()};
}

void reset_peak_memory(Device dev) {
  Counters& c = counters(dev);
  c.peak.store(c.live.load());
}

}  // namespace omniq
