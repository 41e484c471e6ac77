// Argument checks and device dispatch of the LET-fused weight fake-quant (ops/fake_quant_let.h).
#include "ops/fake_quant_let.h"

#include "runtime/error.h"

namespace omniq {

namespace {

void check_scale(const Tensor* s, int64_t n, const Tensor& w, const char* op, const char* name) {
  if (!s) return;
  OMNIQ_CHECK(s->defined(), "%s: %s scale is undefined", op, name);
  check_dtype(*s, DType::f32, op, name);
  OMNIQ_CHECK(s->ndim() == 1 && s->numel() == n, "%s: %s scale %s must be [%lld] for w %s", op, name,
              s->str().c_str(), static_cast<long long>(n), w.str().c_str());
  check_same_device(*s, w, op);
}

// Validates w, spec, LWC and the scales; returns the group parameters.
GroupQuantParams check_args(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma, const Tensor* beta,
                            const LetScales& let, const char* op) {
  OMNIQ_CHECK(w.defined(), "%s: w is undefined", op);
  check_float(w, op, "w");
  OMNIQ_CHECK(w.ndim() == 2, "%s: w must be a matrix [out, in], got %s", op, w.str().c_str());
  spec.validate(w.size(1), op);
  OMNIQ_CHECK(spec.enabled(), "%s: needs a quantized weight (bits < 16)", op);
  OMNIQ_CHECK(fake_quant_let_supported(w.size(0), w.size(1), spec),
              "%s: w %s with group size %d is not a layout the fused op handles (per-channel, in <= %lld, "
              "in %% 8 == 0); compose mul/div and fake_quant_weight instead",
              op, w.str().c_str(), spec.group_size, static_cast<long long>(kFakeQuantLetMaxIn));
  OMNIQ_CHECK((gamma == nullptr) == (beta == nullptr), "%s: give both LWC gamma and beta, or neither", op);
  for (const Tensor* p : {gamma, beta}) {
    if (!p) continue;
    check_dtype(*p, DType::f32, op, "gamma/beta");
    OMNIQ_CHECK(p->numel() == w.size(0), "%s: LWC parameter %s must have one value per row of w %s", op,
                p->str().c_str(), w.str().c_str());
    check_same_device(*p, w, op);
  }
  check_scale(let.col, w.size(1), w, op, "column");
  check_scale(let.row, w.size(0), w, op, "row");
  GroupQuantParams p;
  p.group = w.size(1);
  p.bits = spec.bits;
  p.symmetric = spec.symmetric;
  return p;
}

}  // namespace

bool fake_quant_let_supported(int64_t out_features, int64_t in_features, const WeightQuantSpec& spec) {
  const bool per_channel = spec.group_size == 0 || spec.group_size == in_features;
  return spec.enabled() && per_channel && out_features > 0 && in_features > 0 && in_features <= kFakeQuantLetMaxIn &&
         in_features % 8 == 0;
}

Tensor fake_quant_let_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma, const Tensor* beta,
                              const LetScales& let, DType out_dtype) {
  const char* op = "fake_quant_let_forward";
  const GroupQuantParams p = check_args(w, spec, gamma, beta, let, op);
  OMNIQ_CHECK(dtype_is_float(out_dtype), "%s: out_dtype must be f32, bf16 or f16, got %s", op, dtype_name(out_dtype));
  Tensor y = Tensor::empty(w.shape(), out_dtype, w.device());
  if (w.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::fake_quant_let_forward(w, p, gamma, beta, let, y);
#else
    OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
#endif
  } else {
    cpu::fake_quant_let_forward(w, p, gamma, beta, let, y);
  }
  return y;
}

FakeQuantLetGrads fake_quant_let_backward(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec,
                                          const Tensor* gamma, const Tensor* beta, const LetScales& let) {
  const char* op = "fake_quant_let_backward";
  const GroupQuantParams p = check_args(w, spec, gamma, beta, let, op);
  OMNIQ_CHECK(dy.defined() && dy.shape() == w.shape(), "%s: dy must have w's shape %s", op, w.str().c_str());
  check_float(dy, op, "dy");
  check_same_device(dy, w, op);
  FakeQuantLetGrads g;
  const Device dev = w.device();
  if (gamma) {
    g.dgamma = Tensor::empty(gamma->shape(), DType::f32, dev);
    g.dbeta = Tensor::empty(beta->shape(), DType::f32, dev);
  }
  if (let.col) g.dcol = Tensor::empty({w.size(1)}, DType::f32, dev);
  if (let.row) g.drow = Tensor::empty({w.size(0)}, DType::f32, dev);
  if (dev.is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::fake_quant_let_backward(dy, w, p, gamma, beta, let, g);
#else
    OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
#endif
  } else {
    cpu::fake_quant_let_backward(dy, w, p, gamma, beta, let, g);
  }
  return g;
}

}  // namespace omniq
