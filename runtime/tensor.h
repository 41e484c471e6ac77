// Tensor: dtype, shape (up to 4-D), contiguous row-major storage on one device.
//
// Tensors are move-only handles. Several tensors may share one Storage through *views*
// (view_rows, reshape, alias): views are cheap and explicit; data copies are explicit too
// (clone, to(device), to(dtype), copy_from).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/storage.h"

namespace omniq {

constexpr int kMaxDims = 4;

struct Shape {
  int ndim = 0;
  int64_t dims[kMaxDims] = {0, 0, 0, 0};

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  explicit Shape(const std::vector<int64_t>& d);
  int64_t numel() const;
  int64_t operator[](int i) const { return dims[i]; }
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[2, 3]"
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  // ---- construction ----
  static Tensor empty(const Shape& shape, DType dtype, Device dev = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype, Device dev = Device::cpu());
  static Tensor full(const Shape& shape, float value, DType dtype, Device dev = Device::cpu());
  // Host fp32 values converted to `dtype` and placed on `dev`.
  static Tensor from_f32(const std::vector<float>& values, const Shape& shape, DType dtype = DType::f32,
                         Device dev = Device::cpu());
  static Tensor from_i32(const std::vector<int32_t>& values, const Shape& shape, Device dev = Device::cpu());
  // Uniform values in [lo, hi) from a fixed seed (deterministic across machines).
  static Tensor uniform(const Shape& shape, float lo, float hi, uint64_t seed, DType dtype = DType::f32,
                        Device dev = Device::cpu());

  // ---- properties ----
  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim; }
  int64_t size(int i) const;  // negative i counts from the end
  int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  // Rows and columns of the tensor seen as a matrix: rows = product of all but the last dim.
  int64_t rows() const;
  int64_t cols() const { return shape_.ndim ? shape_.dims[shape_.ndim - 1] : 1; }
  std::string str() const;  // "bf16[4, 256] on cuda:0"

  void* data() const;
  template <typename T>
  T* data_as() const { return static_cast<T*>(data()); }

  // ---- views (share storage) ----
  Tensor view_rows(int64_t start, int64_t count) const;  // slice of the first dimension
  Tensor reshape(const Shape& shape) const;               // same numel, contiguous
  Tensor alias() const;                                   // another handle on the same data
  bool shares_storage_with(const Tensor& o) const { return storage_ && storage_ == o.storage_; }

  // ---- copies ----
  Tensor clone() const;
  Tensor to(Device dev) const;
  Tensor to(DType dt) const;
  void copy_from(const Tensor& src);  // same shape; converts dtype/device as needed
  void fill(float value);
  void zero();

  // ---- host access, mostly for tests and I/O ----
  std::vector<float> to_f32_vector() const;    // float dtypes
  std::vector<int32_t> to_i32_vector() const;  // integer dtypes
  float item() const;                          // the single element as fp32

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes into storage
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu();
};

// Checks used by ops to validate arguments with a clear message (name is the argument's name).
void check_same_device(const Tensor& a, const Tensor& b, const char* op);
void check_dtype(const Tensor& t, DType dt, const char* op, const char* name);
void check_float(const Tensor& t, const char* op, const char* name);
void check_shape(const Tensor& t, const Shape& s, const char* op, const char* name);

}  // namespace omniq
