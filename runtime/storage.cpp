#include "runtime/storage.h"

#include <utility>

#include "runtime/allocator.h"

namespace omniq {

Storage::Storage(Device dev, size_t bytes) : ptr_(device_alloc(dev, bytes)), bytes_(bytes), device_(dev) {}

Storage::~Storage() { release(); }

Storage::Storage(Storage&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), device_(o.device_) {}

Storage& Storage::operator=(Storage&& o) noexcept {
  if (this != &o) {
    release();
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_ = o.device_;
  }
  return *this;
}

void Storage::release() noexcept {
  device_free(device_, ptr_, bytes_);
  ptr_ = nullptr;
  bytes_ = 0;
}

}  // namespace omniq
