// Weight fake-quant with LET's per-channel scales applied on the fly (spec/omniquant.md §4): one
// pass over the original weight instead of a chain of weight-sized f32 ops.
//
// LET trains scales s that are fused into the Linear weights: a consumer's input columns are
// multiplied by its pair's scale, a producer's output rows are divided by (or, for k_proj under the
// qkt pair, multiplied by) another. Written as separate ops (w·c, then ÷ r, then fake-quant) each
// step reads and writes the whole weight in f32 several times forward and backward, and reduces the
// products over rows and columns for the scales' gradients: on a LLaMA-7B block that was ≈ 3 ms of a
// 9.6 ms W4A4 training step. This op computes exactly the same ŵ:
//
//   v_ij = w_ij · c_j            (c: column scale, optional)
//   u_ij = v_ij / r_i  or  v_ij · r_i   (r: row scale, optional; LetScales::row_divide)
//   ŵ    = fake-quant(u) with LWC (ops/fake_quant.h), rounded once to out_dtype
//
// each step one IEEE fp32 operation in this order (bit-identical to the op chain, on both backends),
// and its backward returns the gradients of Σ dy·ŵ with respect to γ, β, c and r in one pass:
//   du = the quantizer's dx (STE mask + the max/min tie shares, ops/fake_quant.h)
//   dr_i = Σ_j du_ij · (−u_ij / r_i)  (÷)   or   Σ_j du_ij · v_ij  (·)
//   dv   = du / r_i  (÷)   or   du · r_i  (·)
//   dc_j = Σ_i dv_ij · w_ij
// The column sums are deterministic (fixed-order partial sums, no atomics).
//
// Supported layout: per-output-channel quantization (one group per row, group size 0) with
// in_features ≤ kFakeQuantLetMaxIn and a multiple of 8 — the W-A settings LET is used for. Callers
// check fake_quant_let_supported() and otherwise compose the separate ops.
#pragma once
#include "ops/fake_quant.h"
#include "runtime/tensor.h"

namespace omniq {

constexpr int64_t kFakeQuantLetMaxIn = 8192;  // a CUDA block keeps one whole row in registers

struct LetScales {
  const Tensor* col = nullptr;  // f32 [in] or null
  const Tensor* row = nullptr;  // f32 [out] or null
  bool row_divide = false;      // u = v / r (true) or v · r (false)
};

struct FakeQuantLetGrads {
  Tensor dgamma, dbeta;  // f32, undefined without LWC
  Tensor dcol, drow;     // f32 [in] / [out], undefined without that scale
};

// Whether the fused op handles a weight [out, in] quantized with `spec`.
bool fake_quant_let_supported(int64_t out_features, int64_t in_features, const WeightQuantSpec& spec);

// ŵ in out_dtype. w: [out, in] f32|bf16|f16 (an f16 copy of fp16-exact weights gives the same ŵ as
// f32, with half the bytes read); gamma/beta as fake_quant_weight_forward (both or neither).
Tensor fake_quant_let_forward(const Tensor& w, const WeightQuantSpec& spec, const Tensor* gamma, const Tensor* beta,
                              const LetScales& let, DType out_dtype);
// dy: [out, in], any float dtype. Fresh tensors (the caller accumulates).
FakeQuantLetGrads fake_quant_let_backward(const Tensor& dy, const Tensor& w, const WeightQuantSpec& spec,
                                          const Tensor* gamma, const Tensor* beta, const LetScales& let);

// ---- backends (arguments validated by the functions above) ----
namespace cpu {
void fake_quant_let_forward(const Tensor& w, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                            const LetScales& let, Tensor& y);
void fake_quant_let_backward(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                             const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void fake_quant_let_forward(const Tensor& w, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                            const LetScales& let, Tensor& y);
void fake_quant_let_backward(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                             const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g);
}  // namespace cuda
#endif

}  // namespace omniq
