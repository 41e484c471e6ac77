// Argument checks and device dispatch for the losses (the math lives in cpu/ and cuda/).
#include "ops/loss.h"

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

}  // namespace omniq
