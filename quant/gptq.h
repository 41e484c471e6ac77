// GPTQ (Frantar et al. 2022): per Linear, weight columns are quantized one at a time and the
// quantization error of each column is pushed onto the not-yet-quantized columns through the inverse
// Hessian of the layer-wise objective ‖WX − ŴX‖², with H = 2·XᵀX over the calibration tokens.
//
// THE SPEC (quant/gptq.cpp, quant/cuda/gptq.cu and tests/reference/gptq_reference.py all implement
// exactly this; it is the reference IST-DASLab/gptq `fasterquant` + `Quantizer` + `llama_sequential`
// with --true-sequential, the numbers below are its steps):
//   1. per-channel (group_size 0): scale/zero of every row from the ORIGINAL weight (before 2.)
//   2. dead inputs (H_ii = 0): H_ii = 1, W[:, i] = 0
//   3. static_groups: scale/zero of every group from W after 2., in the original column order
//   4. act_order: columns permuted by descending diag(H) (W and H); the result is un-permuted
//   5. H += percdamp·mean(diag H)·I; Hinv = upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU)
//   6. blocks of block_size columns: for column i, q = quant(w_i); err = (w_i − q)/U_ii;
//      w_j −= err·U_ij for the later columns j of the block; after the block, the columns right of
//      it get W −= Err·U[block, right] (one GEMM).
//   Dynamic groups (not static): the scale/zero of the group starting at column k·g (permuted order)
//   come from W at that moment. Like the reference, W is only updated at block boundaries (the
//   in-block updates live in its copy W1), so a group starting inside a block sees the block-start
//   values: we therefore compute the parameters of all groups starting in a block at block start.
//   With g = block_size (the default 128) this is the same thing.
//   7. (gptq_quantize_block) true-sequential: per decoder block, the Linears are quantized in input
//      groups in forward order; a group's H is built from the inputs produced by the block with the
//      earlier groups already quantized (f32 weights), and the next block's inputs come from the
//      fully quantized block (the caller's quantized stream). H accumulates in fp32 as
//      H ← H·n/(n+m) + 2/(n+m)·XᵀX (tokens counted; the reference counts samples: a constant factor).
//
// The quantizer (per row, or per group of g columns), asymmetric levels 0..qmax = 2^N − 1:
//   range_contains_zero = true (DEFAULT, the original GPTQ `Quantizer.find_params`, mse off):
//     xmax = max(max(x), 0), xmin = min(min(x), 0)     (the range is forced to contain 0)
//     hi = a·xmax, lo = b·xmin                         (a, b: optional LWC clip factors, else 1)
//     symmetric: m = max(|lo|, |hi|), lo = −m, hi = m  (*)
//     if hi == 0 and lo == 0: lo = −1, hi = 1
//     scale = (hi − lo)/qmax (no clamp), zp = round(−lo/scale) ∈ [0, qmax] (symmetric: zp = 2^(N−1))
//     q = clamp(round(x/scale) + zp, 0, qmax), x̂ = (q − zp)·scale
//   so the output is OmniQuant's asymmetric (scale, zero point) format with 0 ≤ zp ≤ qmax; the
//   symmetric variant is omniq's signed format q' = q − 2^(N−1) ∈ [−2^(N−1), 2^(N−1)−1] (no zero
//   point) with scale 2m/qmax instead of fake_quant's m/(2^(N−1)−1).
//   (*) the original leaves lo = 0 when a group has no negative value (it only mirrors a negative
//   xmin), which throws away half the levels; we always mirror. Weights practically never hit this.
//   range_contains_zero = false: OmniQuant's UniformAffineQuantizer, ops/fake_quant.h bit for bit
//   (range not forced to contain 0, scale clamped to [1e-5, 1e4], LWC factors likewise), so with a
//   diagonal H (no error feedback) GPTQ returns exactly fake_quant_weight_forward(w, γ, β).
// round = round-half-to-even (torch.round); every quantizer step is one fp32 operation in this order
// (no FMA contraction) on both backends, so CPU and CUDA agree bit for bit given the same W and U.
//
// OmniQuant-then-GPTQ (composition): GptqClip holds per-group factors a = σ(γ), b = σ(β) learned by
// LWC; they scale the group's max/min whenever that group's scale/zero are fixed (step 1, 3 or the
// dynamic group start); the rest of GPTQ is unchanged. Groups are those of fake_quant (row-major
// [out, in/g]); with act_order and dynamic groups a permuted group is no original group, so clipping
// then requires static_groups. Factors all 1 give the unclipped result bit for bit (x·1 is exact).
// To reproduce exactly the quantizer LWC was trained with, set range_contains_zero = false; with the
// default the clipped range is the 0-containing one (identical for every group with min < 0 < max).
//
// Linear algebra: H is brought to the host and factorised in double (no LAPACK/cuSOLVER in the
// build): U = J·chol(J·H·J)⁻¹·J with J the reversal permutation — the upper Cholesky factor of H⁻¹
// with one Cholesky and one triangular inverse (the reference does chol → cholesky_inverse → chol;
// the factor is unique, so the result is the same up to rounding; the Python reference also
// factorises in float64). Cost ~ (2/3)·in³ host flops per Hessian (shared by all Linears of one
// input group), seconds for in ≈ 3k.
// Backends: CPU = loops + cpu::gemm_f32 for the inter-block update; CUDA = one warp per weight row
// for the in-block column loop, cuBLASLt GEMMs for H accumulation and the inter-block update.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "models/decoder_block.h"
#include "ops/fake_quant.h"
#include "runtime/tensor.h"

namespace omniq {

// LWC clip factors of one Linear (host f32, [out·in/g] row-major like fake_quant's γ/β groups):
// hi[k] = σ(γ_k) scales group k's max, lo[k] = σ(β_k) its min. Empty = no clipping.
struct GptqClip {
  std::vector<float> hi, lo;
  bool empty() const { return hi.empty(); }
};
// Factors from LWC parameters γ, β (f32, any device, any shape with out·in/g elements), with σ
// evaluated exactly as ops/fake_quant does (fp64, rounded once to fp32).
GptqClip gptq_clip_from_lwc(const Tensor& gamma, const Tensor& beta);
// Factors given directly (f32 tensors of σ values, any device).
GptqClip gptq_clip_from_factors(const Tensor& hi, const Tensor& lo);

struct GptqOptions {
  double percdamp = 0.01;     // dampening λ = percdamp·mean(diag H)
  int64_t block_size = 128;   // columns per lazy-update block
  bool act_order = false;     // columns in order of descending diag(H)
  bool static_groups = false; // group scale/zero fixed up front from the (dead-zeroed) original weight
  bool range_contains_zero = true;  // the original GPTQ quantizer; false: ops/fake_quant.h's (see above)
  // OmniQuant-then-GPTQ: site ("q_proj", ...) -> LWC clip factors, used by gptq_quantize_block.
  // Sites not listed are not clipped.
  std::map<std::string, GptqClip> clip;
};

// Quantizes one Linear. w: [out, in] f32 (CPU or CUDA); H: [in, in] f32 on w's device (not modified).
// clip: optional LWC factors (null or empty = none). Returns the fake-quantized weight (same
// shape/dtype/device as w). With H = I (no error feedback) this is RTN with the GPTQ quantizer.
Tensor gptq_quantize_linear(const Tensor& w, const Tensor& H, const WeightQuantSpec& spec, const GptqOptions& opt,
                            const GptqClip* clip = nullptr);

// H ← H·count/(count+n) + 2/(count+n)·XᵀX, count += n, for x [..., in] (f32 or bf16; CUDA also f16)
// with n = x.rows() tokens. So after all batches H = (2/n_total)·Σ XᵀX: the reference scales by
// 2/nsamples counting *samples*; with equal-length samples this differs by the constant seqlen, and
// GPTQ is invariant to a positive scale of H (the dampening is relative), so the results agree.
// H: f32 [in, in] on x's device; allocated (zeros) when undefined.
void gptq_accumulate_hessian(Tensor& H, int64_t& count, const Tensor& x);

// Quantizes every Linear of one block sequentially: groups in forward order (LLaMA {q,k,v} {o}
// {gate,up} {down}; OPT {q,k,v} {out} {fc1} {fc2}). For each group the block runs over all samples of
// inps ([N, T, C], any compute dtype; Linear weights/biases are cast to it for the forward) with
// the current weights (earlier groups already quantized) and the group's common input is captured
// into H; then each Linear of the group is quantized (one factorisation per group).
// weights: the block's weights, Linear weights f32, modified in place. opt.clip[site] clips that site.
void gptq_quantize_block(const ModelConfig& cfg, BlockWeights& weights, const Tensor& inps,
                         const WeightQuantSpec& spec, const GptqOptions& opt);

// The Linear sites of a block grouped by their shared input, in forward order.
std::vector<std::vector<std::string>> gptq_site_groups(const ModelConfig& cfg);

// ---- internals shared by the backends ----
namespace gptq_detail {

// Everything derived from H alone (host side), in the permuted column order.
struct PreparedHessian {
  int64_t n = 0;
  std::vector<int32_t> perm;     // permuted column j is original column perm[j] (identity without act_order)
  std::vector<uint8_t> dead;     // original column i had H_ii == 0
  std::vector<float> hinv;       // U (upper, row-major n×n, lower part 0): H⁻¹ = UᵀU of the damped permuted H
};
PreparedHessian prepare_hessian(const Tensor& H, const GptqOptions& opt);

// Which scale/zero set each permuted column uses, and which sets are computed when.
struct GroupPlan {
  int64_t len = 0;               // columns per set (in for per-channel)
  int64_t nsets = 0;
  std::vector<int32_t> col_set;  // [in]: set of permuted column j
};
GroupPlan plan_groups(int64_t in, const WeightQuantSpec& spec, const GptqOptions& opt, const PreparedHessian& ph);

}  // namespace gptq_detail

// clip: null or validated (out·nsets factors each).
namespace cpu {
Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt, const GptqClip* clip);
}
#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt, const GptqClip* clip);
void gptq_accumulate_hessian(Tensor& H, const Tensor& x, float alpha, float beta);  // H = beta·H + alpha·XᵀX
}  // namespace cuda
#endif

}  // namespace omniq
