// Argument validation and device dispatch for the GEMM ops (see ops/matmul.h).
#include "ops/matmul.h"

#include "ops/op_checks.h"
#include "runtime/error.h"

namespace omniq {

namespace {

bool is_gemm_dtype(DType dt) { return dt == DType::f32 || dt == DType::bf16 || dt == DType::f16; }

void check_gemm_dtype(const Tensor& t, const char* op, const char* name) {
  OMNIQ_CHECK(is_gemm_dtype(t.dtype()), "%s: %s is %s; supported dtypes are f32, bf16 and f16", op, name,
              t.str().c_str());
}

using detail::check_defined;
#ifndef OMNIQ_HAS_CUDA
using detail::no_cuda;
#endif

void check_linear_operands(const Tensor& x, const Tensor& w, const char* op) {
  check_defined(x, op, "x");
  check_defined(w, op, "w");
  check_gemm_dtype(x, op, "x");
  OMNIQ_CHECK(x.dtype() == w.dtype(), "%s: x %s and w %s must have the same dtype", op, x.str().c_str(),
              w.str().c_str());
  check_same_device(x, w, op);
  OMNIQ_CHECK(x.ndim() >= 1, "%s: x must have at least 1 dimension, got %s", op, x.str().c_str());
  OMNIQ_CHECK(w.ndim() == 2, "%s: w must be [N, K], got %s", op, w.str().c_str());
  OMNIQ_CHECK(x.cols() == w.size(1), "%s: x %s has K=%lld features but w %s expects K=%lld", op,
              x.str().c_str(), (long long)x.cols(), w.str().c_str(), (long long)w.size(1));
  OMNIQ_CHECK(x.cols() > 0, "%s: x %s has zero input features", op, x.str().c_str());
}

}  // namespace

Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* residual) {
  const char* op = "linear_forward";
  check_linear_operands(x, w, op);
  if (residual) {
    check_defined(*residual, op, "residual");
    Shape want = x.shape();
    want.dims[want.ndim - 1] = w.size(0);
    OMNIQ_CHECK(residual->shape() == want, "%s: residual %s must have the output's shape %s (x %s, w %s)", op,
                residual->str().c_str(), want.str().c_str(), x.str().c_str(), w.str().c_str());
    OMNIQ_CHECK(residual->dtype() == x.dtype(), "%s: residual %s must have x's dtype %s", op,
                residual->str().c_str(), dtype_name(x.dtype()));
    check_same_device(x, *residual, op);
  }
  if (bias) {
    check_defined(*bias, op, "bias");
    OMNIQ_CHECK(bias->ndim() == 1 && bias->size(0) == w.size(0), "%s: bias %s must be [N] = [%lld] for w %s", op,
                bias->str().c_str(), (long long)w.size(0), w.str().c_str());
    OMNIQ_CHECK(bias->dtype() == x.dtype(), "%s: bias %s must have x's dtype %s", op, bias->str().c_str(),
                dtype_name(x.dtype()));
    check_same_device(x, *bias, op);
  }
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::linear_forward(x, w, bias, residual);
#else
    no_cuda(op, x);
#endif
  }
  return cpu::linear_forward(x, w, bias, residual);
}

LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db, DType dw_dtype) {
  const char* op = "linear_backward";
  OMNIQ_CHECK(dw_dtype == DType::f32 || dw_dtype == x.dtype(), "%s: dw_dtype %s must be f32 or x's dtype %s", op,
              dtype_name(dw_dtype), dtype_name(x.dtype()));
  check_linear_operands(x, w, op);
  check_defined(dy, op, "dy");
  OMNIQ_CHECK(dy.dtype() == x.dtype(), "%s: dy %s must have x's dtype %s", op, dy.str().c_str(),
              dtype_name(x.dtype()));
  check_same_device(dy, x, op);
  OMNIQ_CHECK(dy.cols() == w.size(0) && dy.rows() == x.rows(),
              "%s: dy %s does not match the output of x %s times w %s (expected %lld rows of %lld)", op,
              dy.str().c_str(), x.str().c_str(), w.str().c_str(), (long long)x.rows(), (long long)w.size(0));
  if (!need_dx && !need_dw && !need_db) return {};
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::linear_backward(dy, x, w, need_dx, need_dw, need_db, dw_dtype);
#else
    no_cuda(op, x);
#endif
  }
  LinearGrads g = cpu::linear_backward(dy, x, w, need_dx, need_dw, need_db);
  if (g.dw.defined() && g.dw.dtype() != dw_dtype) g.dw = g.dw.to(dw_dtype);
  return g;
}

void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx) {
  const char* op = "linear_backward_dx_accumulate";
  check_defined(dy, op, "dy");
  check_defined(w, op, "w");
  check_defined(dx, op, "dx");
  check_gemm_dtype(dy, op, "dy");
  OMNIQ_CHECK(dy.dtype() == w.dtype() && dx.dtype() == w.dtype(), "%s: dy %s, w %s and dx %s must share one dtype",
              op, dy.str().c_str(), w.str().c_str(), dx.str().c_str());
  check_same_device(dy, w, op);
  check_same_device(dx, w, op);
  OMNIQ_CHECK(w.ndim() == 2, "%s: w must be [N, K], got %s", op, w.str().c_str());
  OMNIQ_CHECK(dy.ndim() >= 1 && dx.ndim() >= 1 && dy.cols() == w.size(0) && dx.cols() == w.size(1) &&
                  dy.rows() == dx.rows(),
              "%s: dy %s times w %s does not give dx %s (expected dy [..., N], dx [..., K] with the same rows)", op,
              dy.str().c_str(), w.str().c_str(), dx.str().c_str());
  OMNIQ_CHECK(w.size(0) > 0, "%s: w %s has no output features", op, w.str().c_str());
  // The GEMM reads dy and w while it writes dx: an overlap would read partly updated values.
  OMNIQ_CHECK(!dx.shares_storage_with(dy) && !dx.shares_storage_with(w),
              "%s: dx %s shares storage with dy %s or w %s", op, dx.str().c_str(), dy.str().c_str(),
              w.str().c_str());
  if (dx.numel() == 0) return;
  if (dx.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::linear_backward_dx_accumulate(dy, w, dx);
    return;
#else
    no_cuda(op, dx);
#endif
  }
  cpu::linear_backward_dx_accumulate(dy, w, dx);
}

Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha,
           std::optional<DType> out_dtype) {
  const char* op = "bmm";
  check_defined(a, op, "a");
  check_defined(b, op, "b");
  check_gemm_dtype(a, op, "a");
  OMNIQ_CHECK(a.dtype() == b.dtype(), "%s: a %s and b %s must have the same dtype", op, a.str().c_str(),
              b.str().c_str());
  check_same_device(a, b, op);
  OMNIQ_CHECK(a.ndim() >= 2 && a.ndim() == b.ndim(), "%s: a %s and b %s must both be [..., rows, cols] of one rank",
              op, a.str().c_str(), b.str().c_str());
  for (int i = 0; i + 2 < a.ndim(); ++i)
    OMNIQ_CHECK(a.size(i) == b.size(i), "%s: batch dims of a %s and b %s differ", op, a.str().c_str(),
                b.str().c_str());
  const int64_t ka = trans_a ? a.size(-2) : a.size(-1);
  const int64_t kb = trans_b ? b.size(-1) : b.size(-2);
  OMNIQ_CHECK(ka == kb, "%s: inner dims differ: op(a) of %s (trans_a=%d) has K=%lld, op(b) of %s (trans_b=%d) has K=%lld",
              op, a.str().c_str(), trans_a, (long long)ka, b.str().c_str(), trans_b, (long long)kb);
  OMNIQ_CHECK(ka > 0, "%s: inner dim K of a %s and b %s is zero", op, a.str().c_str(), b.str().c_str());
  const DType odt = out_dtype.value_or(a.dtype());
  OMNIQ_CHECK(is_gemm_dtype(odt), "%s: out_dtype %s is not a float dtype (f32, bf16, f16)", op, dtype_name(odt));
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::bmm(a, b, trans_a, trans_b, alpha, odt);
#else
    no_cuda(op, a);
#endif
  }
  return cpu::bmm(a, b, trans_a, trans_b, alpha, odt);
}

}  // namespace omniq
