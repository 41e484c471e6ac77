// Device dispatch, broadcast classification and argument checks of the elementwise ops.
#include "ops/elementwise.h"

#include "runtime/error.h"

namespace omniq {

const char* binary_op_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::add: return "add";
    case BinaryOp::sub: return "sub";
    case BinaryOp::mul: return "mul";
    case BinaryOp::div: return "div";
  }
  return "binary";
}

Broadcast binary_broadcast(const Tensor& a, const Tensor& b, const char* op) {
  const int64_t R = a.rows(), C = a.cols();
  if (b.shape() == a.shape()) return Broadcast::same;
  if (b.numel() == 1) return Broadcast::scalar;
  if (b.ndim() >= 1 && b.cols() == C && b.rows() == 1) return Broadcast::row;
  if (b.ndim() >= 2 && b.cols() == 1 && b.rows() == R) {
    // [R, 1], or a's leading dims followed by 1.
    bool leading_match = b.ndim() == a.ndim();
    for (int i = 0; leading_match && i + 1 < a.ndim(); ++i) leading_match = b.shape()[i] == a.shape()[i];
    if (leading_match || b.ndim() == 2) return Broadcast::col;
  }
  OMNIQ_FAIL(
      "%s: cannot broadcast b %s against a %s; b must have a's shape, one element, a row of %lld elements "
      "([%lld]) or a column of %lld elements (a's shape with last dim 1, or [%lld, 1])",
      op, b.str().c_str(), a.str().c_str(), static_cast<long long>(C), static_cast<long long>(C),
      static_cast<long long>(R), static_cast<long long>(R));
}

namespace {

void check_operands(const Tensor& a, const Tensor& b, const char* op) {
  OMNIQ_CHECK(a.defined() && b.defined(), "%s: an operand is undefined", op);
  check_float(a, op, "a");
  check_float(b, op, "b");
  check_same_device(a, b, op);
}

[[noreturn, maybe_unused]] void no_cuda(const char* op, const Tensor& t) {
  OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, t.str().c_str());
}

}  // namespace

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  const char* name = binary_op_name(op);
  check_operands(a, b, name);
  Broadcast bc = binary_broadcast(a, b, name);
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::binary(op, a, b, bc);
#else
    no_cuda(name, a);
#endif
  }
  return cpu::binary(op, a, b, bc);
}

Tensor add(const Tensor& a, const Tensor& b) { return binary(BinaryOp::add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary(BinaryOp::sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary(BinaryOp::mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary(BinaryOp::div, a, b); }

Tensor scale(const Tensor& a, float s) {
  OMNIQ_CHECK(a.defined(), "scale: operand is undefined");
  check_float(a, "scale", "a");
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::scale(a, s);
#else
    no_cuda("scale", a);
#endif
  }
  return cpu::scale(a, s);
}

void add_inplace(Tensor& a, const Tensor& b, float alpha) {
  check_operands(a, b, "add_inplace");
  OMNIQ_CHECK(a.shape() == b.shape(), "add_inplace: a %s and b %s must have the same shape", a.str().c_str(),
              b.str().c_str());
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::add_inplace(a, b, alpha);
    return;
#else
    no_cuda("add_inplace", a);
#endif
  }
  cpu::add_inplace(a, b, alpha);
}

BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, bool need_da,
                            bool need_db) {
  const char* name = "binary_backward";
  check_operands(a, b, name);
  OMNIQ_CHECK(dy.defined(), "binary_backward(%s): dy is undefined", binary_op_name(op));
  check_float(dy, name, "dy");
  check_same_device(dy, a, name);
  OMNIQ_CHECK(dy.shape() == a.shape(), "binary_backward(%s): dy %s must have a's shape %s", binary_op_name(op),
              dy.str().c_str(), a.shape().str().c_str());
  Broadcast bc = binary_broadcast(a, b, name);
  if (!need_da && !need_db) return {};
  // Both backends take dy in a's dtype (the common case already; a conversion otherwise).
  Tensor dy_conv;
  if (dy.dtype() != a.dtype()) dy_conv = dy.to(a.dtype());
  const Tensor& g = dy_conv.defined() ? dy_conv : dy;
  if (a.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::binary_backward(op, g, a, b, bc, need_da, need_db);
#else
    no_cuda(name, a);
#endif
  }
  return cpu::binary_backward(op, g, a, b, bc, need_da, need_db);
}

}  // namespace omniq
