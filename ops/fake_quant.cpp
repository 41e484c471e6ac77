// Argument checks and device dispatch for the fake quantizers (the math lives in cpu/ and cuda/).
#include "ops/fake_quant.h"

#include <cmath>

#include "runtime/error.h"

namespace omniq {

namespace {

#ifndef OMNIQ_HAS_CUDA
[[noreturn]] void no_cuda(const char* op) {
  OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
}
#endif

void check_data(const Tensor& x, const char* op, const char* name) {
  OMNIQ_CHECK(x.defined(), "%s: %s is undefined", op, name);
  check_float(x, op, name);
}

// dy must match x's shape and device; same_dtype: also its dtype (else any float dtype).
void check_grad(const Tensor& dy, const Tensor& x, const char* op, bool same_dtype) {
  OMNIQ_CHECK(dy.defined(), "%s: dy is undefined", op);
  OMNIQ_CHECK(dy.shape() == x.shape(), "%s: dy %s must have the shape of the input %s", op, dy.str().c_str(),
              x.str().c_str());
  if (same_dtype) {
    OMNIQ_CHECK(dy.dtype() == x.dtype(), "%s: dy %s must have the input's dtype %s", op, dy.str().c_str(),
                dtype_name(x.dtype()));
  } else {
    check_float(dy, op, "dy");
  }
  check_same_device(dy, x, op);
}

// LWC parameters: both or neither; f32 with one value per group ([n] or [n, 1]) on w's device.
bool check_lwc(const Tensor* gamma, const Tensor* beta, const Tensor& w, int64_t groups, const char* op) {
  OMNIQ_CHECK((gamma == nullptr) == (beta == nullptr),
              "%s: LWC needs both gamma (upper bound) and beta (lower bound), got only %s", op,
              gamma ? "gamma" : "beta");
  if (!gamma) return false;
  for (const Tensor* p : {gamma, beta}) {
    const char* name = p == gamma ? "gamma" : "beta";
    OMNIQ_CHECK(p->defined(), "%s: %s is undefined", op, name);
    check_dtype(*p, DType::f32, op, name);
    const bool shape_ok = p->numel() == groups && (p->ndim() == 1 || (p->ndim() == 2 && p->size(1) == 1));
    OMNIQ_CHECK(shape_ok, "%s: %s %s must have one value per quantization group: [%lld] or [%lld, 1] for w %s",
                op, name, p->str().c_str(), static_cast<long long>(groups), static_cast<long long>(groups),
                w.str().c_str());
    check_same_device(*p, w, op);
  }
  return true;
}

// A weight w [out, in] with a valid spec; returns the group parameters of its quantizer.
GroupQuantParams weight_groups(const Tensor& w, const WeightQuantSpec& spec, const char* op) {
  check_data(w, op, "w");
  OMNIQ_CHECK(w.ndim() == 2, "%s: w must be a matrix [out, in], got %s", op, w.str().c_str());
  spec.validate(w.size(1), strformat("%s's w %s", op, w.str().c_str()).c_str());
  GroupQuantParams p;
  p.group = spec.group_len(w.size(1));
  p.bits = spec.bits;
  p.symmetric = spec.symmetric;
  return p;
}

void check_act_bits(int bits, const char* op) {
  OMNIQ_CHECK((bits >= 2 && bits <= 8) || bits >= 16,
              "%s: abits %d unsupported: use 2..8, or >= 16 for no quantization", op, bits);
}

void forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta, Tensor& y,
             const char* op) {
  if (x.numel() == 0) return;
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::fake_quant_groups_forward(x, p, gamma, beta, y);
#else
    no_cuda(op);
#endif
  } else {
    cpu::fake_quant_groups_forward(x, p, gamma, beta, y);
  }
}

void backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
              Tensor* dx, Tensor* dgamma, Tensor* dbeta, const char* op) {
  if (x.numel() == 0) {
    if (dgamma) dgamma->zero();
    if (dbeta) dbeta->zero();
    return;
  }
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::fake_quant_groups_backward(dy, x, p, gamma, beta, dx, dgamma, dbeta);
#else
    no_cuda(op);
#endif
  } else {
    cpu::fake_quant_groups_backward(dy, x, p, gamma, beta, dx, dgamma, dbeta);
  }
}

}  // namespace

void WeightQuantSpec::validate(int64_t in_features, const char* what) const {
  OMNIQ_CHECK((bits >= 2 && bits <= 8) || bits == 16, "wbits %d unsupported: use 2..8, or 16 for no quantization",
              bits);
  OMNIQ_CHECK(in_features > 0, "in_features %lld of %s must be positive", static_cast<long long>(in_features), what);
  OMNIQ_CHECK(group_size >= 0, "group size %d must be >= 0 (0 = per output channel) for %s", group_size, what);
  OMNIQ_CHECK(group_size == 0 || in_features % group_size == 0,
              "group size %d does not divide in_features %lld of %s (use a divisor, or 0 for per-channel)",
              group_size, static_cast<long long>(in_features), what);
}

Tensor fake_quant_weight_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma,
                                 const Tensor* beta, DType out_dtype) {
  const char* op = "fake_quant_weight_forward";
  const GroupQuantParams p = weight_groups(w, spec, op);
  OMNIQ_CHECK(dtype_is_float(out_dtype), "%s: out_dtype must be f32, bf16 or f16, got %s", op,
              dtype_name(out_dtype));
  const bool lwc = check_lwc(gamma, beta, w, spec.num_groups(w.size(0), w.size(1)), op);
  if (!spec.enabled()) return w.to(out_dtype);  // 16 bits: not quantized (a copy), LWC has no effect
  Tensor y = Tensor::empty(w.shape(), out_dtype, w.device());
  forward(w, p, lwc ? gamma : nullptr, lwc ? beta : nullptr, y, op);
  return y;
}

Tensor fake_quant_weight_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma,
                                 const Tensor* beta) {
  check_data(w, "fake_quant_weight_forward", "w");
  return fake_quant_weight_forward(w, spec, gamma, beta, w.dtype());
}

FakeQuantWeightGrads fake_quant_weight_backward(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec,
                                                const Tensor* gamma, const Tensor* beta, bool need_dw) {
  const char* op = "fake_quant_weight_backward";
  const GroupQuantParams p = weight_groups(w, spec, op);
  check_grad(dy, w, op, /*same_dtype=*/false);
  const bool lwc = check_lwc(gamma, beta, w, spec.num_groups(w.size(0), w.size(1)), op);
  FakeQuantWeightGrads g;
  if (lwc) {
    g.dgamma = Tensor::empty(gamma->shape(), DType::f32, w.device());
    g.dbeta = Tensor::empty(beta->shape(), DType::f32, w.device());
  }
  if (!spec.enabled()) {  // identity: dw = dy, the clipping parameters do nothing
    if (need_dw) g.dw = dy.to(w.dtype());  // dw has w's dtype
    if (lwc) {
      g.dgamma.zero();
      g.dbeta.zero();
    }
    return g;
  }
  if (need_dw) g.dw = Tensor::empty(w.shape(), w.dtype(), w.device());
  if (!need_dw && !lwc) return g;  // nothing to compute
  backward(dy, w, p, lwc ? gamma : nullptr, lwc ? beta : nullptr, need_dw ? &g.dw : nullptr,
           lwc ? &g.dgamma : nullptr, lwc ? &g.dbeta : nullptr, op);
  return g;
}

Tensor fake_quant_act_forward(const Tensor& x, int bits) {
  const char* op = "fake_quant_act_forward";
  check_data(x, op, "x");
  OMNIQ_CHECK(x.ndim() >= 1, "%s: x must have at least one dimension (..., C), got %s", op, x.str().c_str());
  check_act_bits(bits, op);
  if (bits >= 16) return x.clone();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  GroupQuantParams p;
  p.group = x.cols();
  p.bits = bits;
  forward(x, p, nullptr, nullptr, y, op);
  return y;
}

Tensor fake_quant_act_backward(const Tensor& dy, const Tensor& x, int bits) {
  const char* op = "fake_quant_act_backward";
  check_data(x, op, "x");
  OMNIQ_CHECK(x.ndim() >= 1, "%s: x must have at least one dimension (..., C), got %s", op, x.str().c_str());
  check_grad(dy, x, op, /*same_dtype=*/true);
  check_act_bits(bits, op);
  if (bits >= 16) return dy.clone();
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  GroupQuantParams p;
  p.group = x.cols();
  p.bits = bits;
  backward(dy, x, p, nullptr, nullptr, &dx, nullptr, nullptr, op);
  return dx;
}

Tensor abs_floor_ste(const Tensor& s, float floor) {
  const char* op = "abs_floor_ste";
  check_data(s, op, "s");
  OMNIQ_CHECK(std::isfinite(floor) && floor > 0.0f, "%s: floor must be finite and > 0, got %g", op, floor);
  Tensor y = Tensor::empty(s.shape(), s.dtype(), s.device());
  if (s.numel() == 0) return y;
  if (s.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::abs_floor_ste(s, floor, y);
#else
    no_cuda(op);
#endif
  } else {
    cpu::abs_floor_ste(s, floor, y);
  }
  return y;
}

Tensor abs_floor_ste_backward(const Tensor& dy) {
  check_data(dy, "abs_floor_ste_backward", "dy");
  return dy.clone();  // straight-through: the floor passes the gradient unchanged
}

}  // namespace omniq
