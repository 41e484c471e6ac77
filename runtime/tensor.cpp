#include "runtime/tensor.h"

#include <cmath>
#include <cstring>
#include <random>

#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_backend.h"
#endif

namespace omniq {

// ---------------------------------------------------------------------------------------------
// Shape

Shape::Shape(std::initializer_list<int64_t> d) : Shape(std::vector<int64_t>(d)) {}

Shape::Shape(const std::vector<int64_t>& d) {
  OMNIQ_CHECK(d.size() <= static_cast<size_t>(kMaxDims), "tensors have at most %d dimensions, got %zu", kMaxDims,
              d.size());
  ndim = static_cast<int>(d.size());
  for (int i = 0; i < ndim; ++i) {
    OMNIQ_CHECK(d[i] >= 0, "negative dimension %lld in shape", static_cast<long long>(d[i]));
    dims[i] = d[i];
  }
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= dims[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------
// host conversion helpers

namespace {

float load_as_f32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::i32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case DType::i8: return static_cast<float>(static_cast<const int8_t*>(p)[i]);
    case DType::u8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    default: OMNIQ_FAIL("unknown dtype");
  }
}

void store_from_f32(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::f16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::i32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::i8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case DType::u8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    default: OMNIQ_FAIL("unknown dtype");
  }
}

int64_t load_as_i64(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::i32: return static_cast<const int32_t*>(p)[i];
    case DType::i8: return static_cast<const int8_t*>(p)[i];
    case DType::u8: return static_cast<const uint8_t*>(p)[i];
    default: return static_cast<int64_t>(load_as_f32(p, dt, i));
  }
}

void store_from_i64(void* p, DType dt, int64_t i, int64_t v) {
  switch (dt) {
    case DType::i32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::i8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case DType::u8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    default: store_from_f32(p, dt, i, static_cast<float>(v));
  }
}

// Host conversion between any two dtypes; integer<->integer goes through int64 to stay exact.
void host_convert(const void* src, DType sdt, void* dst, DType ddt, int64_t n) {
  if (sdt == ddt) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(sdt));
    return;
  }
  if (!dtype_is_float(sdt) && !dtype_is_float(ddt)) {
    for (int64_t i = 0; i < n; ++i) store_from_i64(dst, ddt, i, load_as_i64(src, sdt, i));
    return;
  }
  if (!dtype_is_float(ddt)) {  // float -> int rounds to nearest
    for (int64_t i = 0; i < n; ++i) store_from_i64(dst, ddt, i, std::llround(load_as_f32(src, sdt, i)));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_from_f32(dst, ddt, i, load_as_f32(src, sdt, i));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// construction

Tensor Tensor::empty(const Shape& shape, DType dtype, Device dev) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = dev;
  t.storage_ = std::make_shared<Storage>(dev, static_cast<size_t>(shape.numel()) * dtype_size(dtype));
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device dev) {
  Tensor t = empty(shape, dtype, dev);
  t.zero();
  return t;
}

Tensor Tensor::full(const Shape& shape, float value, DType dtype, Device dev) {
  Tensor t = empty(shape, dtype, dev);
  t.fill(value);
  return t;
}

Tensor Tensor::from_f32(const std::vector<float>& values, const Shape& shape, DType dtype, Device dev) {
  OMNIQ_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "from_f32: %zu values for shape %s",
              values.size(), shape.str().c_str());
  Tensor host = empty(shape, dtype, Device::cpu());
  host_convert(values.data(), DType::f32, host.data(), dtype, shape.numel());
  return dev.is_cpu() ? std::move(host) : host.to(dev);
}

Tensor Tensor::from_i32(const std::vector<int32_t>& values, const Shape& shape, Device dev) {
  OMNIQ_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "from_i32: %zu values for shape %s",
              values.size(), shape.str().c_str());
  Tensor host = empty(shape, DType::i32, Device::cpu());
  std::memcpy(host.data(), values.data(), values.size() * sizeof(int32_t));
  return dev.is_cpu() ? std::move(host) : host.to(dev);
}

Tensor Tensor::uniform(const Shape& shape, float lo, float hi, uint64_t seed, DType dtype, Device dev) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = dist(rng);
  return from_f32(v, shape, dtype, dev);
}

// ---------------------------------------------------------------------------------------------
// properties

int64_t Tensor::size(int i) const {
  int j = i < 0 ? shape_.ndim + i : i;
  OMNIQ_CHECK(j >= 0 && j < shape_.ndim, "dimension %d out of range for a %d-D tensor", i, shape_.ndim);
  return shape_.dims[j];
}

int64_t Tensor::rows() const {
  int64_t r = 1;
  for (int i = 0; i + 1 < shape_.ndim; ++i) r *= shape_.dims[i];
  return r;
}

std::string Tensor::str() const {
  return std::string(dtype_name(dtype_)) + shape_.str() + " on " + device_.str();
}

void* Tensor::data() const {
  OMNIQ_CHECK(storage_ != nullptr, "use of an undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_;
}

// ---------------------------------------------------------------------------------------------
// views

Tensor Tensor::view_rows(int64_t start, int64_t count) const {
  OMNIQ_CHECK(shape_.ndim >= 1, "view_rows on a 0-D tensor");
  OMNIQ_CHECK(start >= 0 && count >= 0 && start + count <= shape_.dims[0],
              "view_rows(%lld, %lld) out of range for %s", static_cast<long long>(start),
              static_cast<long long>(count), str().c_str());
  Tensor t = alias();
  int64_t row_elems = shape_.dims[0] ? numel() / shape_.dims[0] : 0;
  t.offset_ += static_cast<size_t>(start * row_elems) * dtype_size(dtype_);
  t.shape_.dims[0] = count;
  return t;
}

Tensor Tensor::reshape(const Shape& shape) const {
  OMNIQ_CHECK(shape.numel() == numel(), "reshape %s -> %s changes the number of elements", shape_.str().c_str(),
              shape.str().c_str());
  Tensor t = alias();
  t.shape_ = shape;
  return t;
}

Tensor Tensor::alias() const {
  Tensor t;
  t.storage_ = storage_;
  t.offset_ = offset_;
  t.shape_ = shape_;
  t.dtype_ = dtype_;
  t.device_ = device_;
  return t;
}

// ---------------------------------------------------------------------------------------------
// copies

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(Device dev) const {
  Tensor t = empty(shape_, dtype_, dev);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dt) const {
  Tensor t = empty(shape_, dt, device_);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  OMNIQ_CHECK(src.numel() == numel(), "copy_from: %s into %s", src.str().c_str(), str().c_str());
  int64_t n = numel();
  if (n == 0) return;
  if (device_.is_cpu() && src.device_.is_cpu()) {
    host_convert(src.data(), src.dtype_, data(), dtype_, n);
    return;
  }
#ifdef OMNIQ_HAS_CUDA
  if (src.dtype_ != dtype_) {
    // Convert on the side where the data is, then move.
    if (src.device_.is_cuda() && device_ == src.device_) {
      cuda_rt::convert(device_.index, src.data(), src.dtype_, data(), dtype_, n);
    } else {
      Tensor tmp = src.to(dtype_);
      copy_from(tmp);
    }
    return;
  }
  size_t bytes = nbytes();
  if (device_.is_cuda() && src.device_.is_cpu()) {
    cuda_rt::memcpy_h2d(device_.index, data(), src.data(), bytes);
  } else if (device_.is_cpu() && src.device_.is_cuda()) {
    cuda_rt::memcpy_d2h(src.device_.index, data(), src.data(), bytes);
  } else if (device_ == src.device_) {
    cuda_rt::memcpy_d2d(device_.index, data(), src.data(), bytes);
  } else {
    Tensor host = src.to(Device::cpu());
    copy_from(host);
  }
#else
  OMNIQ_FAIL("this omniq was built without CUDA: cannot copy %s into %s", src.str().c_str(), str().c_str());
#endif
}

void Tensor::fill(float value) {
  int64_t n = numel();
  if (n == 0) return;
  if (device_.is_cpu()) {
    if (value == 0.0f) {
      std::memset(data(), 0, nbytes());
      return;
    }
    for (int64_t i = 0; i < n; ++i) store_from_f32(data(), dtype_, i, value);
    return;
  }
#ifdef OMNIQ_HAS_CUDA
  cuda_rt::fill(device_.index, data(), dtype_, n, value);
#endif
}

void Tensor::zero() { fill(0.0f); }

std::vector<float> Tensor::to_f32_vector() const {
  if (device_.is_cuda()) return to(Device::cpu()).to_f32_vector();
  std::vector<float> v(static_cast<size_t>(numel()));
  host_convert(data(), dtype_, v.data(), DType::f32, numel());
  return v;
}

std::vector<int32_t> Tensor::to_i32_vector() const {
  if (device_.is_cuda()) return to(Device::cpu()).to_i32_vector();
  std::vector<int32_t> v(static_cast<size_t>(numel()));
  host_convert(data(), dtype_, v.data(), DType::i32, numel());
  return v;
}

float Tensor::item() const {
  OMNIQ_CHECK(numel() == 1, "item() needs a single-element tensor, got %s", str().c_str());
  return to_f32_vector()[0];
}

// ---------------------------------------------------------------------------------------------
// argument checks

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  OMNIQ_CHECK(a.device() == b.device(), "%s: tensors on different devices (%s vs %s); move them with .to()", op,
              a.device().str().c_str(), b.device().str().c_str());
}

void check_dtype(const Tensor& t, DType dt, const char* op, const char* name) {
  OMNIQ_CHECK(t.dtype() == dt, "%s: %s must be %s, got %s", op, name, dtype_name(dt), t.str().c_str());
}

void check_float(const Tensor& t, const char* op, const char* name) {
  OMNIQ_CHECK(dtype_is_float(t.dtype()), "%s: %s must be f32, f16 or bf16, got %s", op, name, t.str().c_str());
}

void check_shape(const Tensor& t, const Shape& s, const char* op, const char* name) {
  OMNIQ_CHECK(t.shape() == s, "%s: %s must have shape %s, got %s", op, name, s.str().c_str(), t.str().c_str());
}

}  // namespace omniq
