// A block of memory on one device, RAII and move-only: copying a buffer is always explicit
// (Tensor::clone / Tensor::to), never an accident of the language.
#pragma once
#include <cstddef>

#include "runtime/device.h"

namespace omniq {

class Storage {
 public:
  Storage() = default;
  Storage(Device dev, size_t bytes);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  Storage(Storage&& o) noexcept;
  Storage& operator=(Storage&& o) noexcept;

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void release() noexcept;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::cpu();
};

}  // namespace omniq
