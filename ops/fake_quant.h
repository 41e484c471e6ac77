// Fused fake quantizers of OmniQuant (spec/omniquant.md §1–3): the weight quantizer with learnable
// weight clipping (LWC), the dynamic per-token activation quantizer, and the |s| floor used by LET.
// Forward and hand-written backward, CPU reference (ops/cpu/fake_quant.cpp) and CUDA kernels
// (ops/cuda/fake_quant.cu). Data may be f32, bf16 or f16; all quantizer math is fp32; LWC
// parameters and their gradients are f32.
//
// Both quantizers work on contiguous *groups*: a weight [out, in] with group size g is seen as
// [out·in/g, g] (g = in for per-output-channel); an activation [..., C] is seen as rows × C.
// Per group (the reference code's UniformAffineQuantizer, asymmetric):
//   xmax = max(x), xmin = min(x)                (the range is NOT forced to contain 0)
//   xmax' = σ(γ)·xmax, xmin' = σ(β)·xmin        (LWC; without it xmax' = xmax, xmin' = xmin)
//   qmax  = 2^N − 1
//   scale = clamp((xmax' − xmin') / qmax, 1e-5, 1e4)
//   zp    = round(clamp(−xmin' / scale, −1e4, 1e4))
//   q     = clamp(round(x / scale) + zp, 0, qmax),   x̂ = (q − zp)·scale
// round is round-half-to-even (torch.round). Every step is one IEEE fp32 operation in this order,
// with no FMA contraction, so the CPU and CUDA paths produce bit-identical x̂ in f32 (and in bf16,
// which only rounds the result). σ is evaluated in fp64 and rounded to fp32 on both backends (a
// float exp differs by an ulp between libm and CUDA, which would move the scale by an ulp and flip
// rounding decisions); PyTorch's fp32 sigmoid differs from it by at most an ulp.
//
// Symmetric variant (WeightQuantSpec::symmetric): scale = clamp(max(|xmax'|, |xmin'|)/(2^(N−1)−1),
// 1e-5, 1e4), no zero point, q = clamp(round(x/scale), −2^(N−1), 2^(N−1)−1), x̂ = q·scale: the usual
// two's-complement signed range (int4 = −8..7), so packed export needs no offset. The reference code
// instead adds a zero point 2^(N−1)−1 and clamps to 0..2^N−1, i.e. the range −(2^(N−1)−1)..2^(N−1);
// the two agree except for values clipped by LWC beyond ±(2^(N−1)−1)·scale.
//
// Backward = exactly what PyTorch autograd gives for the reference code, where x/scale is rounded
// with the straight-through `round_ste` but zp with a plain `.round()` (zero gradient, so nothing
// flows through zp at all):
//   in = [0 ≤ round(x/s) + zp ≤ qmax]                      (clamp bounds inclusive, as torch.clamp)
//   ∂x̂/∂x|scale fixed = in,   ∂x̂/∂scale = in ? round(x/s) − x/s : q − zp
//   dscale = Σ_group dy·∂x̂/∂scale, passed on only where 1e-5 ≤ (xmax'−xmin')/qmax ≤ 1e4
//   dxmax' = dscale/qmax, dxmin' = −dscale/qmax
//     (symmetric: d max(|xmax'|,|xmin'|) = dscale/(2^(N−1)−1), routed to the larger magnitude times
//      its sign, split in half on a tie, as torch.maximum and abs do)
//   dγ = dxmax'·xmax·σ(γ)(1−σ(γ)), dxmax = dxmax'·σ(γ)      (likewise β, xmin)
//   dx = dy·in + dxmax/#argmax·[x = xmax] + dxmin/#argmin·[x = xmin]
//     (amax/amin backward: ties share the gradient evenly)
// dx of a weight is needed when LET makes the weight a function of trainable scales.
#pragma once
#include <cstdint>

#include "runtime/tensor.h"

namespace omniq {

// How a Linear's weight is quantized. bits = 16 means "not quantized" (forward is the identity).
struct WeightQuantSpec {
  int bits = 16;
  int group_size = 0;  // 0 = per output channel (one group per row)
  bool symmetric = false;

  bool enabled() const { return bits < 16; }
  // Elements per group for a weight with in_features columns.
  int64_t group_len(int64_t in_features) const { return group_size > 0 ? group_size : in_features; }
  // Number of groups (= LWC parameters per γ/β) of an [out, in] weight.
  int64_t num_groups(int64_t out_features, int64_t in_features) const {
    return out_features * (in_features / group_len(in_features));
  }
  // Throws a clear error for unsupported bits or a group size that does not divide in_features;
  // `what` names the layer (e.g. "q_proj").
  void validate(int64_t in_features, const char* what) const;
};

struct FakeQuantWeightGrads {
  Tensor dw;      // w's shape and dtype; undefined unless need_dw
  Tensor dgamma;  // f32, gamma's shape; undefined without LWC
  Tensor dbeta;   // f32, beta's shape; undefined without LWC
};

// ŵ = fake-quant(w) in out_dtype. w: [out, in] f32|bf16|f16; out_dtype f32|bf16|f16. gamma, beta:
// both null (no LWC) or both f32 with out·in/g elements ([n] or [n, 1], group k = row k·g/in,
// columns (k·g) mod in ...+g). The quantizer runs in fp32 whatever the dtypes; out_dtype only rounds
// the fp32 ŵ once (RNE), so a bf16 result is bit-identical to the f32 result cast to bf16 — and it
// saves the cast's extra pass over the weight (f32 master weights feeding bf16 GEMMs).
Tensor fake_quant_weight_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma,
                                 const Tensor* beta, DType out_dtype);
// The same with out_dtype = w's dtype.
Tensor fake_quant_weight_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma,
                                 const Tensor* beta);
// Gradients of Σ dy·ŵ. dy: w's shape, any float dtype (f32 as the dW GEMM writes it, or bf16/f16:
// read as is, no conversion pass); dw has w's dtype. Fresh tensors: the caller accumulates.
FakeQuantWeightGrads fake_quant_weight_backward(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec,
                                                const Tensor* gamma, const Tensor* beta, bool need_dw);

// Dynamic per-token activation fake-quant (spec §3): asymmetric min–max over the LAST dim of x
// [..., C] (each row its own group), no clipping, no learnable parameters, same formulas and
// gradient rules as the weight quantizer (dx includes the path through the row's scale to its
// argmax/argmin elements). bits 2..8; bits >= 16 is the identity (a copy), as the reference code's
// `n_bits >= 16` shortcut. For attention operands pass Q/K/V as [B, T, H, D] (or [B, H, T, D]): they
// are then quantized per (token, head) over head_dim, exactly as the reference code's per-token
// quantizers on its [bsz, heads, seq, head_dim] tensors.
Tensor fake_quant_act_forward(const Tensor& x, int bits);
Tensor fake_quant_act_backward(const Tensor& dy, const Tensor& x, int bits);  // dx, x's dtype

// LET's floor on |s| during training (spec §4): sign(s)·max(|s|, floor) with sign(0) = +1, in s's
// dtype; floor must be > 0. The backward is the identity (straight-through), exposed for the
// autograd wrapper: it returns a copy of dy.
Tensor abs_floor_ste(const Tensor& s, float floor);
Tensor abs_floor_ste_backward(const Tensor& dy);

// ---- backends (arguments already validated by the functions above; call those instead) ----
// x is seen as [numel/group, group] groups of contiguous elements. y (forward) and dy (backward)
// may have a float dtype other than x's; dx has x's dtype. The CUDA kernels take f32/bf16/f16.
struct GroupQuantParams {
  int64_t group = 0;  // elements per group
  int bits = 4;       // 2..8
  bool symmetric = false;
};

namespace cpu {
void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y);
// dx, dgamma, dbeta may each be null (not needed); dgamma/dbeta are non-null only with gamma/beta.
void fake_quant_groups_backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma,
                                const Tensor* beta, Tensor* dx, Tensor* dgamma, Tensor* dbeta);
void abs_floor_ste(const Tensor& s, float floor, Tensor& y);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y);
void fake_quant_groups_backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma,
                                const Tensor* beta, Tensor* dx, Tensor* dgamma, Tensor* dbeta);
void abs_floor_ste(const Tensor& s, float floor, Tensor& y);
}  // namespace cuda
#endif

}  // namespace omniq
