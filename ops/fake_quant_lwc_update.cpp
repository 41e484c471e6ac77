// Argument checks and device dispatch of the fused LWC step (ops/fake_quant_lwc_update.h).
#include "ops/fake_quant_lwc_update.h"

#include "ops/op_checks.h"
#include "runtime/error.h"

namespace omniq {

bool fake_quant_lwc_update_supported(const WeightQuantSpec& spec, DType w_dtype, DType w_hat_dtype) {
  return spec.enabled() && dtype_is_float(w_dtype) && dtype_is_float(w_hat_dtype);
}

void fake_quant_lwc_update(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec, Tensor& gamma,
                           Tensor& beta, Tensor& m_gamma, Tensor& v_gamma, Tensor& m_beta, Tensor& v_beta,
                           const Tensor& scalars, int64_t slot_gamma, int64_t slot_beta, Tensor& w_hat) {
  const char* op = "fake_quant_lwc_update";
  detail::check_defined(w, op, "w");
  detail::check_defined(dy, op, "dy");
  detail::check_defined(w_hat, op, "w_hat");
  detail::check_defined(scalars, op, "scalars");
  check_float(w, op, "w");
  check_float(dy, op, "dy");
  check_float(w_hat, op, "w_hat");
  OMNIQ_CHECK(w.ndim() == 2, "%s: w must be a matrix [out, in], got %s", op, w.str().c_str());
  spec.validate(w.size(1), strformat("%s's w %s", op, w.str().c_str()).c_str());
  OMNIQ_CHECK(fake_quant_lwc_update_supported(spec, w.dtype(), w_hat.dtype()),
              "%s: %d-bit spec with w %s and w_hat %s is not fused (check fake_quant_lwc_update_supported)", op,
              spec.bits, w.str().c_str(), w_hat.str().c_str());
  OMNIQ_CHECK(dy.shape() == w.shape() && w_hat.shape() == w.shape(), "%s: dy %s and w_hat %s must have w's shape %s",
              op, dy.str().c_str(), w_hat.str().c_str(), w.str().c_str());
  OMNIQ_CHECK(!w_hat.shares_storage_with(w) && !w_hat.shares_storage_with(dy),
              "%s: w_hat %s must not share storage with w or dy (it is written while they are read)", op,
              w_hat.str().c_str());
  const int64_t groups = spec.num_groups(w.size(0), w.size(1));
  const char* names[6] = {"gamma", "beta", "m_gamma", "v_gamma", "m_beta", "v_beta"};
  Tensor* ps[6] = {&gamma, &beta, &m_gamma, &v_gamma, &m_beta, &v_beta};
  for (int i = 0; i < 6; ++i) {
    detail::check_defined(*ps[i], op, names[i]);
    check_dtype(*ps[i], DType::f32, op, names[i]);
    OMNIQ_CHECK(ps[i]->numel() == groups, "%s: %s %s must have one value per quantization group (%lld) of w %s", op,
                names[i], ps[i]->str().c_str(), static_cast<long long>(groups), w.str().c_str());
    check_same_device(*ps[i], w, op);
  }
  check_same_device(dy, w, op);
  check_same_device(w_hat, w, op);
  check_same_device(scalars, w, op);
  check_dtype(scalars, DType::f32, op, "scalars");
  OMNIQ_CHECK(scalars.numel() % 7 == 0, "%s: scalars %s must hold 7 floats per row (detail::AdamWScalars)", op,
              scalars.str().c_str());
  const int64_t rows = scalars.numel() / 7;
  OMNIQ_CHECK(slot_gamma >= 0 && slot_gamma < rows && slot_beta >= 0 && slot_beta < rows,
              "%s: slots %lld (gamma) and %lld (beta) must be rows of scalars %s (%lld rows)", op,
              static_cast<long long>(slot_gamma), static_cast<long long>(slot_beta), scalars.str().c_str(),
              static_cast<long long>(rows));
  if (w.numel() == 0) return;
  GroupQuantParams p;
  p.group = spec.group_len(w.size(1));
  p.bits = spec.bits;
  p.symmetric = spec.symmetric;
  const LwcAdamWState s{&gamma, &beta, &m_gamma, &v_gamma, &m_beta, &v_beta, &scalars, slot_gamma, slot_beta};
  if (w.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::fake_quant_lwc_update(dy, w, p, s, w_hat);
#else
    detail::no_cuda(op, w);
#endif
  } else {
    cpu::fake_quant_lwc_update(dy, w, p, s, w_hat);
  }
}

}  // namespace omniq
