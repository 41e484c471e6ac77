// Multi-head scaled-dot-product attention with grouped-query attention (GQA), and its causal
// softmax as a standalone op.
//
// Layouts (what the Q/K/V projections produce, no transposes needed by the caller):
//   q, out, dout: [B, T, Hq, D]     k, v, dk, dv: [B, T, Hkv, D]     lse: [B, Hq, T] f32
// Query head h reads kv head h / (Hq / Hkv) (Hugging Face repeat_kv). Softmax is computed in fp32;
// outputs have q's dtype. Causal masking lets query i see keys j <= i.
#pragma once
#include "runtime/tensor.h"

namespace omniq {

// out = softmax(scale · q·kᵀ [masked]) · v per head. When lse_out is non-null it receives the
// per-row log-sum-exp of the scaled, masked scores ([B, Hq, T] f32), which the backward needs.
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out);

// Gradients for an upstream dout: dq [B,T,Hq,D], and dk, dv [B,T,Hkv,D] summed over the query heads
// that share each kv head. All in q's dtype. `out` and `lse` are what attention_forward returned.
struct AttentionGrads {
  Tensor dq, dk, dv;
};
AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal);

// Whether attention backwards on CUDA are bit-reproducible. The flash backward (bf16/f16, D 64/128)
// adds dQ over key tiles, and with split query heads dK/dV over CTAs, in fp32: deterministic mode
// fixes the order of those adds (per-tile semaphores, ops/cuda/flash_attention_backward.cu), so
// reruns on the same inputs and GPU give identical bits; off, they go through fp32 atomics in
// scheduling order (last-bit differences from run to run, slightly faster). The materialised and
// CPU paths are deterministic either way. Process-wide; default on, unless the environment sets
// OMNIQ_NONDETERMINISTIC_ATTENTION to anything but "" or "0" (read at the first query; an explicit
// set_attention_deterministic wins over the environment).
void set_attention_deterministic(bool deterministic);
bool attention_deterministic();

// probs[..., i, j] = softmax_j(scale · scores[..., i, j]) over j <= i, and 0 for j > i.
// scores: [..., T, T] f32, bf16 or f16; probs has the same shape and dtype.
Tensor causal_softmax_forward(const Tensor& scores, float scale);
// dscores = scale · P ⊙ (dP − Σ_j P⊙dP) for dprobs dP and the forward's probs P (same shape/dtype).
Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale);

namespace cpu {
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out);
AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal);
Tensor causal_softmax_forward(const Tensor& scores, float scale);
Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out);
AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal);
Tensor causal_softmax_forward(const Tensor& scores, float scale);
Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale);
}  // namespace cuda
#endif

}  // namespace omniq
