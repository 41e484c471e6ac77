// CPU reference of the fused LWC step: literally the composition it replaces (ops/fake_quant_lwc_update.h)
// — the fake-quant backward (dγ, dβ only), one AdamW step on γ and on β with the scalars rows of the
// trainer's buffer, and the fake-quant forward with the new γ', β' into w_hat.
#include "ops/adamw.h"
#include "ops/fake_quant.h"
#include "ops/fake_quant_lwc_update.h"

namespace omniq::cpu {

void fake_quant_lwc_update(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const LwcAdamWState& s,
                           Tensor& w_hat) {
  Tensor dgamma = Tensor::empty(s.gamma->shape(), DType::f32, w.device());
  Tensor dbeta = Tensor::empty(s.beta->shape(), DType::f32, w.device());
  fake_quant_groups_backward(dy, w, p, s.gamma, s.beta, nullptr, &dgamma, &dbeta);
  const auto* rows = reinterpret_cast<const detail::AdamWScalars*>(s.scalars->data());
  adamw_step(*s.gamma, dgamma, *s.m_gamma, *s.v_gamma, rows[s.slot_gamma]);
  adamw_step(*s.beta, dbeta, *s.m_beta, *s.v_beta, rows[s.slot_beta]);
  fake_quant_groups_forward(w, p, s.gamma, s.beta, w_hat);
}

}  // namespace omniq::cpu
