// The weight-only OmniQuant training step's per-weight tail as ONE op: the LWC fake-quant backward,
// the AdamW update of γ, β and the next step's fake-quant forward, fused.
//
// Why: for a weight-only config (W4A16g128, W3A16 per-channel, ...) a training step runs, per Linear
// weight w [out, in] (frozen, e.g. an f16 copy):
//   forward   ŵ = fake_quant(w; γ, β)                       reads w, writes ŵ        (2 + 2 B/elem)
//   GEMMs     use ŵ; the dW GEMM writes dŴ
//   backward  dγ, dβ = fake_quant_backward(dŴ, w; γ, β)     reads w, dŴ              (2 + 2 B/elem)
//   AdamW     γ, β, m, v updated from dγ, dβ (tiny)
// γ_k, β_k of group k depend only on group k's gradient and AdamW is elementwise, so the backward, the
// update and the NEXT step's forward can run per group in one pass: read w and dŴ once, reduce
// dscale → dγ, dβ, update γ, β, m, v, recompute the group's quantizer with the new γ', β' (w still in
// registers / shared memory) and write ŵ' for the next step: 2 + 2 + 2 bytes per element instead of
// 8 (LLaMA-7B block, 202 M weights: ≈ 0.4 GB less traffic, ≈ 0.2 ms of a 5.2 ms step on an H100).
// The caller keeps ŵ in a persistent buffer; the next step's forward is then a no-op (an alias).
//
// Exactly the composition of the existing ops, bit for bit (ops/fake_quant.h, ops/adamw.h):
//   dγ, dβ = fake_quant_weight_backward(dy, w, spec, γ, β)                  (no dw)
//   adamw on (γ, dγ, m_γ, v_γ) with scalars row slot_gamma, on (β, dβ, m_β, v_β) with row slot_beta
//   w_hat  = fake_quant_weight_forward(w, spec, γ', β', w_hat.dtype())
// On the CPU the op IS that composition (ops/cpu/fake_quant_lwc_update.cpp). The CUDA kernel uses the
// same per-group device code, team mapping and summation order as the unfused v2 backward
// (fake_quant_group.cuh, the same group_launch geometry), the same element update as the AdamW
// kernel (detail::adamw_update, σ in fp64) and the same x̂ code as the forward: γ, β, m, v and ŵ are
// bitwise those of the unfused CUDA ops (not with OMNIQ_FQ_V1=1, whose dscale sum order differs).
// The CPU backward sums dscale in double and CUDA in fp32, so CPU and CUDA γ, β, m, v agree to fp32
// summation error only (ŵ is bitwise the CPU forward of the CUDA γ', β').
//
// `scalars` is the trainer's per-step AdamW buffer (f32 [rows·7], row r = detail::AdamWScalars, as
// adamw_scalar_floats writes it), on w's device: read by the kernel at run time, so a CUDA-graph replay
// picks up each step's bias corrections and learning rates (incl. the halved ones of a NaN retry).
#pragma once
#include <cstdint>

#include "ops/fake_quant.h"
#include "runtime/tensor.h"

namespace omniq {

// Whether fake_quant_lwc_update handles this layout (else the caller keeps the unfused ops): a
// quantizing spec (2..8 bits) and float dtypes for w and w_hat. Every group length the fake-quant ops
// take (g32..g128.., per-channel rows of any length) is fused; dy may be any float dtype.
bool fake_quant_lwc_update_supported(const WeightQuantSpec& spec, DType w_dtype, DType w_hat_dtype);

// One fused LWC step for weight w [out, in] (f32|bf16|f16): dy = dL/dŵ (w's shape, f32|bf16|f16, as
// the dW GEMM wrote it). gamma, beta, m_*, v_*: f32, one value per group (spec.num_groups), updated in
// place. scalars: f32 [rows·7], slot_* < rows. w_hat: w's shape, f32|bf16|f16, overwritten with
// fake_quant(w; γ', β'); it must not share storage with w or dy. All tensors on one device.
void fake_quant_lwc_update(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec, Tensor& gamma,
                           Tensor& beta, Tensor& m_gamma, Tensor& v_gamma, Tensor& m_beta, Tensor& v_beta,
                           const Tensor& scalars, int64_t slot_gamma, int64_t slot_beta, Tensor& w_hat);

// ---- backends (arguments already validated by the function above; call that instead) ----
struct LwcAdamWState {
  Tensor* gamma;
  Tensor* beta;
  Tensor* m_gamma;
  Tensor* v_gamma;
  Tensor* m_beta;
  Tensor* v_beta;
  const Tensor* scalars;
  int64_t slot_gamma, slot_beta;
};

namespace cpu {
void fake_quant_lwc_update(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const LwcAdamWState& s,
                           Tensor& w_hat);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void fake_quant_lwc_update(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const LwcAdamWState& s,
                           Tensor& w_hat);
}  // namespace cuda
#endif

}  // namespace omniq
