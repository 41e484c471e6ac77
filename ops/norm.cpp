// Argument checks and device dispatch for RMSNorm / LayerNorm (the math lives in cpu/ and cuda/).
#include "ops/norm.h"

#include <cmath>

#include "runtime/error.h"

namespace omniq {

namespace {

// Checks shared by forward and backward: x float with C > 0, a parameter vector f32 [C] on x's device.
void check_input(const Tensor& x, const char* op) {
  OMNIQ_CHECK(x.defined(), "%s: x is undefined", op);
  OMNIQ_CHECK(x.ndim() >= 1, "%s: x must have at least one dimension (..., C), got %s", op, x.str().c_str());
  check_float(x, op, "x");
  OMNIQ_CHECK(x.cols() > 0, "%s: x has no channels (C = 0): %s", op, x.str().c_str());
  OMNIQ_CHECK(x.cols() <= (int64_t{1} << 30), "%s: C = %lld channels is too large", op,
              static_cast<long long>(x.cols()));
}

void check_param(const Tensor& p, const Tensor& x, const char* op, const char* name) {
  OMNIQ_CHECK(p.defined(), "%s: %s is undefined", op, name);
  check_dtype(p, DType::f32, op, name);  // norm parameters stay f32 (see norm.h)
  check_shape(p, Shape{x.cols()}, op, name);
  check_same_device(p, x, op);
}

void check_eps(float eps, const char* op) {
  OMNIQ_CHECK(std::isfinite(eps) && eps >= 0.0f, "%s: eps must be finite and >= 0, got %g", op, eps);
}

void check_grad_inputs(const Tensor& dy, const Tensor& x, const char* op) {
  OMNIQ_CHECK(dy.defined(), "%s: dy is undefined", op);
  OMNIQ_CHECK(dy.shape() == x.shape(), "%s: dy %s must have the shape of x %s", op, dy.str().c_str(),
              x.str().c_str());
  OMNIQ_CHECK(dy.dtype() == x.dtype(), "%s: dy %s must have x's dtype %s", op, dy.str().c_str(),
              dtype_name(x.dtype()));
  check_same_device(dy, x, op);
}

void check_row_stat(const Tensor& s, const Tensor& x, const char* op, const char* name) {
  OMNIQ_CHECK(s.defined(), "%s: %s is undefined (pass the one the forward returned)", op, name);
  check_dtype(s, DType::f32, op, name);
  OMNIQ_CHECK(s.numel() == x.rows(), "%s: %s %s must have one value per row of x %s (%lld)", op, name,
              s.str().c_str(), x.str().c_str(), static_cast<long long>(x.rows()));
  check_same_device(s, x, op);
}

// The gradient buffer a backward accumulates dx into: x's shape and dtype, no storage shared with
// what the dx kernel reads (dy, x), since the kernel reads those while it rewrites dx_accum.
void check_dx_accum(const Tensor& acc, const Tensor& dy, const Tensor& x, const char* op) {
  OMNIQ_CHECK(acc.defined(), "%s: dx_accum is undefined", op);
  OMNIQ_CHECK(acc.shape() == x.shape() && acc.dtype() == x.dtype(), "%s: dx_accum %s must have x's shape and dtype (%s)",
              op, acc.str().c_str(), x.str().c_str());
  check_same_device(acc, x, op);
  OMNIQ_CHECK(!acc.shares_storage_with(dy) && !acc.shares_storage_with(x),
              "%s: dx_accum %s shares storage with dy or x", op, acc.str().c_str());
}

#ifndef OMNIQ_HAS_CUDA
[[noreturn]] void no_cuda(const char* op) {
  OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
}
#endif

}  // namespace

Tensor rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor* rstd_out) {
  const char* op = "rmsnorm_forward";
  check_input(x, op);
  check_param(w, x, op, "w");
  check_eps(eps, op);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty(Shape{x.rows()}, DType::f32, x.device());
  if (x.rows() > 0) {
    if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
      cuda::rmsnorm_forward(x, w, eps, y, rstd);
#else
      no_cuda(op);
#endif
    } else {
      cpu::rmsnorm_forward(x, w, eps, y, rstd);
    }
  }
  if (rstd_out) *rstd_out = std::move(rstd);
  return y;
}

NormGrads rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, bool need_dx,
                           bool need_dw, Tensor* dx_accum) {
  const char* op = "rmsnorm_backward";
  check_input(x, op);
  check_grad_inputs(dy, x, op);
  check_param(w, x, op, "w");
  check_row_stat(rstd, x, op, "rstd");
  const bool accum = need_dx && dx_accum != nullptr;
  if (accum) check_dx_accum(*dx_accum, dy, x, op);
  NormGrads g;
  // With accumulation the kernels write into a view of the caller's buffer (g.dx is reset below).
  if (accum) g.dx = dx_accum->alias();
  else if (need_dx) g.dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (need_dw) g.dw = Tensor::empty(Shape{x.cols()}, DType::f32, x.device());
  if (x.rows() == 0) {
    if (need_dw) g.dw.zero();
    if (accum) g.dx = Tensor();  // nothing to add
    return g;
  }
  if (!need_dx && !need_dw) return g;
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::rmsnorm_backward(dy, x, w, rstd, g.dx, g.dw, accum);
#else
    no_cuda(op);
#endif
  } else {
    cpu::rmsnorm_backward(dy, x, w, rstd, g.dx, g.dw, accum);
  }
  if (accum) g.dx = Tensor();
  return g;
}

Tensor layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor* mean_out,
                         Tensor* rstd_out) {
  const char* op = "layernorm_forward";
  check_input(x, op);
  check_param(w, x, op, "w");
  check_param(b, x, op, "b");
  check_eps(eps, op);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = Tensor::empty(Shape{x.rows()}, DType::f32, x.device());
  Tensor rstd = Tensor::empty(Shape{x.rows()}, DType::f32, x.device());
  if (x.rows() > 0) {
    if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
      cuda::layernorm_forward(x, w, b, eps, y, mean, rstd);
#else
      no_cuda(op);
#endif
    } else {
      cpu::layernorm_forward(x, w, b, eps, y, mean, rstd);
    }
  }
  if (mean_out) *mean_out = std::move(mean);
  if (rstd_out) *rstd_out = std::move(rstd);
  return y;
}

NormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                             const Tensor& rstd, bool need_dx, bool need_dw, bool need_db, Tensor* dx_accum) {
  const char* op = "layernorm_backward";
  check_input(x, op);
  check_grad_inputs(dy, x, op);
  check_param(w, x, op, "w");
  check_row_stat(mean, x, op, "mean");
  check_row_stat(rstd, x, op, "rstd");
  const bool accum = need_dx && dx_accum != nullptr;
  if (accum) check_dx_accum(*dx_accum, dy, x, op);
  NormGrads g;
  if (accum) g.dx = dx_accum->alias();
  else if (need_dx) g.dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (need_dw) g.dw = Tensor::empty(Shape{x.cols()}, DType::f32, x.device());
  if (need_db) g.db = Tensor::empty(Shape{x.cols()}, DType::f32, x.device());
  if (x.rows() == 0) {
    if (need_dw) g.dw.zero();
    if (need_db) g.db.zero();
    if (accum) g.dx = Tensor();  // nothing to add
    return g;
  }
  if (!need_dx && !need_dw && !need_db) return g;
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::layernorm_backward(dy, x, w, mean, rstd, g.dx, g.dw, g.db, accum);
#else
    no_cuda(op);
#endif
  } else {
    cpu::layernorm_backward(dy, x, w, mean, rstd, g.dx, g.dw, g.db, accum);
  }
  if (accum) g.dx = Tensor();
  return g;
}

}  // namespace omniq
