// Normalisation layers: RMSNorm (LLaMA) and LayerNorm (OPT), forward and hand-written backward.
//
// x is [..., C] (any rank, seen as rows × C), in f32 or bf16 (the CPU reference also takes f16).
// All statistics and arithmetic are fp32; outputs and dx have x's dtype.
//
// Weights and biases are always f32 [C], whatever x's dtype: LET (OmniQuant's learnable equivalent
// transform) divides the norm weights by learned scales during calibration, so they sit next to
// trainable parameters and must not lose precision to bf16 rounding at every step; they are only C
// floats, so keeping them in fp32 costs nothing.
//
// Semantics, so results can be compared with Hugging Face / PyTorch:
//   RMSNorm (= transformers' LlamaRMSNorm):
//     rstd = 1 / sqrt(mean(x²) + eps)          (fp32)
//     x̂    = to_dtype(x · rstd)                 x̂ is rounded to x's dtype *before* the weight
//     y    = to_dtype(w · x̂)                    multiply, as in `weight * hidden.to(input_dtype)`
//   LayerNorm (= torch.nn.functional.layer_norm, biased variance):
//     mean = mean(x), rstd = 1 / sqrt(mean((x − mean)²) + eps)       (fp32)
//     y    = to_dtype((x − mean) · rstd · w + b)                      (one rounding at the end)
//
// Backward: dy has x's shape and dtype; dx comes back in x's dtype, dw/db in f32 [C]. For RMSNorm,
// dw = Σ_rows dy·x̂ uses x̂ rounded as the forward used it (as PyTorch's autograd does); for dx the
// rounding is treated as the identity (straight-through) and dx̂ = dy·w stays fp32, where PyTorch
// would round dx̂ to bf16 first — a difference below the bf16 resolution of dx.
// The backward functions return fresh gradients (no accumulation; autograd does the `+=`). Each
// gradient has a need_* flag: one not needed is left undefined and costs nothing (a constant norm
// weight, as in LWC-only training, skips the dw column sums: two kernels and a scratch buffer).
// dw/db are column sums over all rows; on CUDA they are reduced in a fixed order (per-chunk partial
// sums in an f32 scratch, then a second kernel), so results are deterministic run to run.
#pragma once
#include "runtime/tensor.h"

namespace omniq {

struct NormGrads {
  Tensor dx;  // x's shape and dtype
  Tensor dw;  // f32 [C]
  Tensor db;  // f32 [C]; undefined for RMSNorm (it has no bias)
};

// y = RMSNorm(x) · w. When rstd_out is non-null it receives f32 [rows] (1/sqrt(mean(x²)+eps) per
// row) on x's device, which rmsnorm_backward needs.
Tensor rmsnorm_forward(const Tensor& x /*[..., C]*/, const Tensor& w /*f32 [C]*/, float eps, Tensor* rstd_out);
NormGrads rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd /*f32 [rows]*/,
                           bool need_dx = true, bool need_dw = true, Tensor* dx_accum = nullptr);

// y = LayerNorm(x) · w + b. mean_out / rstd_out (each may be null) receive f32 [rows].
Tensor layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b /*f32 [C]*/, float eps, Tensor* mean_out,
                         Tensor* rstd_out);
NormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                             const Tensor& rstd, bool need_dx = true, bool need_dw = true, bool need_db = true,
                             Tensor* dx_accum = nullptr);
// dx_accum (both backwards): when non-null (and need_dx), dx is not returned but added into
// *dx_accum (x's shape and dtype; it must not share storage with dy or x): the dx kernel reads the
// old value and writes old + dx (fp32 sum, one rounding) in the pass that would have written a
// fresh dx. Autograd uses it for a residual stream whose gradient already exists (the block's h
// gets one gradient from the residual path, one from the norm), saving the add_inplace pass.

// ---- backends (arguments already validated by the functions above; call those instead) ----
// Each writes into preallocated outputs; mean/rstd outputs are always allocated by the caller. A
// gradient output (dx, dw, db) left undefined by the caller is not computed.
// accumulate_dx: dx holds a gradient already and receives dx + (the new dx) instead.
namespace cpu {
void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                      bool accumulate_dx = false);
void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y, Tensor& mean,
                       Tensor& rstd);
void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, Tensor& db, bool accumulate_dx = false);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                      bool accumulate_dx = false);
void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y, Tensor& mean,
                       Tensor& rstd);
void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, Tensor& db, bool accumulate_dx = false);
}  // namespace cuda
#endif

}  // namespace omniq
