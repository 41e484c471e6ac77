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

// Three forward kernels, same results up to fp32 rounding (flash_attention_forward calls the selected
// one): 1: 64-query CTAs, 16 rows per warp (ops/cuda/flash_attention.cu); 2: 128-query CTAs, 32
// rows per warp (ops/cuda/flash_attention_forward_v2.cu), D = 128 only (D = 64 always takes 1); 3,
// the default: Hopper wgmma, 128-query CTAs of 2 warpgroups (ops/cuda/flash_attention_forward_v3.cu),
// D = 128 on sm_90 with an sm_90a build only (flash_forward_v3_available; otherwise 1 runs).
// H100, 7B MHA T = 2048: v3 0.137 ms, v1 0.153, v2 0.172 (it spills).
// OMNIQ_FLASH_FWD_V1 / OMNIQ_FLASH_FWD_V2 set to anything but "" or "0" pick 1 / 2 (read at the
// first query); set_flash_forward_variant (1, 2 or 3) wins over the environment.
void set_flash_forward_variant(int variant);
int flash_forward_variant();
Tensor flash_attention_forward_v1(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out);
Tensor flash_attention_forward_v2(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out);
bool flash_forward_v3_available(const Tensor& q);
Tensor flash_attention_forward_v3(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out);

// dq, dk, dv in q's dtype from delta = rowsum(dout ⊙ out) [B,Hq,T] f32 and the forward's lse.
// kv_splits: over how many CTAs the G = Hq/Hkv query heads of one kv head's key tile are spread
// (must divide G; 0 picks the variant's automatic choice, flash_attention_kv_splits or _v2).
// Exposed so tests can force every path.
// deterministic: fp32 partial sums (dQ over key tiles, dK/dV over splits) are added in a fixed
// order, so the result is bitwise reproducible; false: fp32 atomics in scheduling order. The
// default is the process-wide attention_deterministic() (ops/attention.h).
AttentionGrads flash_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                        int kv_splits = 0, bool deterministic = attention_deterministic());

// The automatic choice of variant 1: the fewest splits (a divisor of G) giving >= 4 CTAs per SM, else G.
int flash_attention_kv_splits(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int sms);
// Variant 2's (128-key CTAs, one resident per SM at D = 128): the fewest splits giving >= 3 CTAs per SM.
int flash_attention_kv_splits_v2(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int sms);

// Three backward kernels, same contract (flash_attention_backward calls the selected one):
//   1: 64-key CTAs of 4 warps (ops/cuda/flash_attention_backward.cu);
//   2: 128-key CTAs of 8 warps (ops/cuda/flash_attention_backward_v2.cu);
//   3, the default: 128-key CTAs of 2 MMA warpgroups, wgmma, and a third warpgroup that sends the dQ
//      parts (ops/cuda/flash_attention_backward_v3ws.cu; OMNIQ_FLASH_BWD_V3_WS=0: the plain form of
//      flash_attention_backward_v3.cu, same bits), where available (else 2 runs). H100, 7B MHA
//      T = 2048, deterministic: v3 0.401 ms (plain form 0.576), v2 0.671.
// Process-wide; OMNIQ_FLASH_BWD_V1 / OMNIQ_FLASH_BWD_V2 set to anything but "" or "0" pick 1 / 2 (read
// at the first query); set_flash_backward_variant (1, 2 or 3) wins over the environment. For A/B
// timing and for tests.
void set_flash_backward_variant(int variant);
int flash_backward_variant();
// Variant 2 computes a 64-query tile's Sᵀ/dPᵀ in 1 or 2 query chunks (same bits; 2, the default, holds
// half the registers live). Process-wide; OMNIQ_FLASH_BWD_QCHUNKS=1 (read at the first query), the setter
// wins. For A/B timing and for tests.
void set_flash_backward_query_chunks(int chunks);
int flash_backward_query_chunks();
AttentionGrads flash_attention_backward_v1(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic);
AttentionGrads flash_attention_backward_v2(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic);
// Variant 3: the wgmma kernel (D = 128, sm_90 GPU, sm_90a build; flash_backward_v3_available in
// flash_attention_backward_v3.h) in variant 2's launch frame.
AttentionGrads flash_attention_backward_v3(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic);

}  // namespace omniq::cuda
