// Device dispatch and argument checks of the activations (see activation.h).
#include "ops/activation.h"

#include "runtime/error.h"

namespace omniq {

namespace {

void check_input(const Tensor& t, const char* op, const char* name) {
  OMNIQ_CHECK(t.defined(), "%s: %s is undefined", op, name);
  check_float(t, op, name);
}

// t itself when it already has dtype dt, else a converted copy held in `holder`.
const Tensor& as_dtype(const Tensor& t, DType dt, Tensor& holder) {
  if (t.dtype() == dt) return t;
  holder = t.to(dt);
  return holder;
}

[[noreturn, maybe_unused]] void no_cuda(const char* op, const Tensor& t) {
  OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, t.str().c_str());
}

}  // namespace

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_forward";
  check_input(gate, op, "gate");
  check_input(up, op, "up");
  check_same_device(gate, up, op);
  OMNIQ_CHECK(gate.shape() == up.shape(), "%s: gate %s and up %s must have the same shape", op, gate.str().c_str(),
              up.str().c_str());
  Tensor hu;
  const Tensor& u = as_dtype(up, gate.dtype(), hu);
  if (gate.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::swiglu_forward(gate, u);
#else
    no_cuda(op, gate);
#endif
  }
  return cpu::swiglu_forward(gate, u);
}

SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_backward";
  check_input(dy, op, "dy");
  check_input(gate, op, "gate");
  check_input(up, op, "up");
  check_same_device(gate, up, op);
  check_same_device(gate, dy, op);
  OMNIQ_CHECK(gate.shape() == up.shape() && dy.shape() == gate.shape(),
              "%s: dy %s, gate %s and up %s must have the same shape", op, dy.str().c_str(), gate.str().c_str(),
              up.str().c_str());
  Tensor hu, hg;
  const Tensor& u = as_dtype(up, gate.dtype(), hu);
  const Tensor& g = as_dtype(dy, gate.dtype(), hg);
  if (gate.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::swiglu_backward(g, gate, u);
#else
    no_cuda(op, gate);
#endif
  }
  return cpu::swiglu_backward(g, gate, u);
}

Tensor relu_forward(const Tensor& x) {
  check_input(x, "relu_forward", "x");
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::relu_forward(x);
#else
    no_cuda("relu_forward", x);
#endif
  }
  return cpu::relu_forward(x);
}

Tensor relu_backward(const Tensor& dy, const Tensor& x) {
  const char* op = "relu_backward";
  check_input(dy, op, "dy");
  check_input(x, op, "x");
  check_same_device(dy, x, op);
  OMNIQ_CHECK(dy.shape() == x.shape(), "%s: dy %s and x %s must have the same shape", op, dy.str().c_str(),
              x.str().c_str());
  Tensor hg;
  const Tensor& g = as_dtype(dy, x.dtype(), hg);
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::relu_backward(g, x);
#else
    no_cuda(op, x);
#endif
  }
  return cpu::relu_backward(g, x);
}

}  // namespace omniq
