// Argument checks and device dispatch for the losses (the math lives in cpu/ and cuda/).
#include "ops/loss.h"

#include <cstdint>

#include "runtime/error.h"

namespace omniq {

namespace {

void check_logits_targets(const Tensor& logits, const Tensor& targets, const char* op) {
  OMNIQ_CHECK(logits.defined() && targets.defined(), "%s: logits and targets must be defined", op);
  OMNIQ_CHECK(logits.ndim() >= 1, "%s: logits must be [N, V], got %s", op, logits.str().c_str());
  check_float(logits, op, "logits");
  OMNIQ_CHECK(logits.cols() > 0, "%s: logits have an empty vocabulary: %s", op, logits.str().c_str());
  OMNIQ_CHECK(logits.cols() <= (int64_t{1} << 30), "%s: vocabulary of %lld entries is too large", op,
              static_cast<long long>(logits.cols()));
  check_dtype(targets, DType::i32, op, "targets");
  OMNIQ_CHECK(targets.numel() == logits.rows(), "%s: targets %s must have one entry per row of logits %s (%lld)", op,
              targets.str().c_str(), logits.str().c_str(), static_cast<long long>(logits.rows()));
  check_same_device(logits, targets, op);
}

void check_pair(const Tensor& a, const Tensor& b, const char* op) {
  OMNIQ_CHECK(a.defined() && b.defined(), "%s: a and b must be defined", op);
  check_float(a, op, "a");
  OMNIQ_CHECK(a.shape() == b.shape() && a.dtype() == b.dtype(), "%s: a %s and b %s must have the same shape and dtype",
              op, a.str().c_str(), b.str().c_str());
  check_same_device(a, b, op);
  OMNIQ_CHECK(a.numel() > 0, "%s: the mean of an empty tensor is undefined (%s)", op, a.str().c_str());
}

#ifndef OMNIQ_HAS_CUDA
[[noreturn]] void no_cuda(const char* op) {
  OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
}
#endif

}  // namespace

Tensor cross_entropy_forward(const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy_forward";
  check_logits_targets(logits, targets, op);
  Tensor nll = Tensor::empty(Shape{logits.rows()}, DType::f32, logits.device());
  if (logits.rows() == 0) return nll;
  if (logits.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::cross_entropy_forward(logits, targets, nll);
#else
    no_cuda(op);
#endif
  } else {
    cpu::cross_entropy_forward(logits, targets, nll);
  }
  return nll;
}

Tensor cross_entropy_backward(const Tensor& dnll, const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy_backward";
  check_logits_targets(logits, targets, op);
  OMNIQ_CHECK(dnll.defined(), "%s: dnll is undefined", op);
  check_dtype(dnll, DType::f32, op, "dnll");
  OMNIQ_CHECK(dnll.numel() == logits.rows(), "%s: dnll %s must have one entry per row of logits %s", op,
              dnll.str().c_str(), logits.str().c_str());
  check_same_device(dnll, logits, op);
  Tensor dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
  if (logits.rows() == 0) return dlogits;
  if (logits.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::cross_entropy_backward(dnll, logits, targets, dlogits);
#else
    no_cuda(op);
#endif
  } else {
    cpu::cross_entropy_backward(dnll, logits, targets, dlogits);
  }
  return dlogits;
}

Tensor mse_loss_forward(const Tensor& a, const Tensor& b) {
  const char* op = "mse_loss_forward";
  check_pair(a, b, op);
  Tensor loss = Tensor::empty(Shape{1}, DType::f32, a.device());
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::mse_loss_forward(a, b, loss);
#else
    no_cuda(op);
#endif
  } else {
    cpu::mse_loss_forward(a, b, loss);
  }
  return loss;
}

Tensor mse_loss_backward(const Tensor& dloss, const Tensor& a, const Tensor& b) {
  const char* op = "mse_loss_backward";
  check_pair(a, b, op);
  OMNIQ_CHECK(dloss.defined(), "%s: dloss is undefined", op);
  check_dtype(dloss, DType::f32, op, "dloss");
  OMNIQ_CHECK(dloss.numel() == 1, "%s: dloss must be a single f32 value, got %s", op, dloss.str().c_str());
  check_same_device(dloss, a, op);
  Tensor da = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::mse_loss_backward(dloss, a, b, da);
#else
    no_cuda(op);
#endif
  } else {
    cpu::mse_loss_backward(dloss, a, b, da);
  }
  return da;
}

MseLossGrad mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                                    const Tensor* loss_into) {
  const char* op = "mse_loss_rows_with_grad";
  OMNIQ_CHECK(y.defined(), "%s: y is undefined", op);
  check_float(y, op, "y");
  OMNIQ_CHECK(y.numel() > 0, "%s: the mean of an empty tensor is undefined (%s)", op, y.str().c_str());
  OMNIQ_CHECK(tables.size() == 1 || tables.size() == 2, "%s: takes 1 or 2 target tables, got %zu", op, tables.size());
  for (const Tensor* tb : tables) {
    OMNIQ_CHECK(tb != nullptr && tb->defined(), "%s: a target table is undefined", op);
    OMNIQ_CHECK(tb->ndim() >= 1 && tb->size(0) > 0 && tb->numel() / tb->size(0) == y.numel(),
                "%s: table %s must be [N, ...] with rows of y's %lld elements (y %s)", op, tb->str().c_str(),
                static_cast<long long>(y.numel()), y.str().c_str());
    OMNIQ_CHECK(tb->dtype() == y.dtype(), "%s: table %s must have y's dtype (y %s)", op, tb->str().c_str(),
                y.str().c_str());
    OMNIQ_CHECK(tb->size(0) <= INT32_MAX, "%s: table %s has more rows than an i32 row index reaches", op,
                tb->str().c_str());
    check_same_device(y, *tb, op);
  }
  OMNIQ_CHECK(row.defined(), "%s: row is undefined", op);
  check_dtype(row, DType::i32, op, "row");
  OMNIQ_CHECK(row.numel() == 1, "%s: row must be a single i32 index, got %s", op, row.str().c_str());
  check_same_device(y, row, op);
  if (loss_into) {
    OMNIQ_CHECK(loss_into->defined() && loss_into->numel() == 1 && loss_into->dtype() == DType::f32,
                "%s: loss_into must be a single f32 value, got %s", op, loss_into->str().c_str());
    check_same_device(y, *loss_into, op);
  }
  MseLossGrad out;
  out.loss = loss_into ? loss_into->alias() : Tensor::empty(Shape{1}, DType::f32, y.device());
  out.dy = Tensor::empty(y.shape(), y.dtype(), y.device());
  if (y.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::mse_loss_rows_with_grad(y, tables, row, out.loss, out.dy);
#else
    no_cuda(op);
#endif
  } else {
    cpu::mse_loss_rows_with_grad(y, tables, row, out.loss, out.dy);
  }
  return out;
}

}  // namespace omniq
