// Flash-style (FA2) attention on CUDA: tiles of Q/K/V stream through shared memory, the scores
// never leave registers, so memory is O(T) instead of the materialised path's O(Hq·T²).
// Internal to the CUDA backend: ops/cuda/attention.cu dispatches here when
// flash_attention_supported() says so and falls back to its cuBLASLt path otherwise.
// Layouts as in ops/attention.h: q/out/dout [B,T,Hq,D], k/v [B,T,Hkv,D], lse/delta [B,Hq,T] f32.
#pragma once
#include "ops/attention.h"
#include "runtime/tensor.h"

namespace omniq::cuda {

// True for bf16/f16 inputs with D in {64, 128} and 16-byte aligned data (the kernels copy rows
// in 16-byte chunks; dout is checked too when given); f32 and other head dims keep the
// materialised path.
bool flash_attention_supported(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* dout = nullptr);

// out and lse (always computed; moved into *lse_out when non-null). Arguments already validated.
Tensor flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                               Tensor* lse_out);

// dq, dk, dv in q's dtype from delta = rowsum(dout ⊙ out) [B,Hq,T] f32 and the forward's lse.
// kv_splits: over how many CTAs the G = Hq/Hkv query heads of one kv head's key tile are spread
// (must divide G; 0 picks flash_attention_kv_splits). Exposed so tests can force both paths.
// deterministic: fp32 partial sums (dQ over key tiles, dK/dV over splits) are added in a fixed
// order, so the result is bitwise reproducible; false: fp32 atomics in scheduling order. The
// default is the process-wide attention_deterministic() (ops/attention.h).
AttentionGrads flash_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                        int kv_splits = 0, bool deterministic = attention_deterministic());

// The automatic choice: the fewest splits (a divisor of G) giving >= 4 CTAs per SM, else G.
int flash_attention_kv_splits(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int sms);

}  // namespace omniq::cuda
