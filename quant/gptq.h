// GPTQ (Frantar et al. 2022): per Linear, weight columns are quantized one at a time and the
// quantization error of each column is pushed onto the not-yet-quantized columns through the inverse
// Hessian of the layer-wise objective ‖WX − ŴX‖², with H = 2·XᵀX over the calibration tokens.
//
// Follows the reference `fasterquant` step by step (numbers are the reference's):
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
// The quantizer is omniq's RTN math (ops/fake_quant.h: asymmetric min–max, range not forced to
// contain 0, scale clamp, round-half-even), so with H = I (or any diagonal H) GPTQ returns exactly
// fake_quant_weight_forward(w). The reference GPTQ quantizer forces the range to contain 0; the
// Python reference in tests/reference/gptq_reference.py uses omniq's quantizer instead, so the two
// are comparable.
//
// Linear algebra: H is brought to the host and factorised in double (no LAPACK/cuSOLVER in the
// build): U = J·chol(J·H·J)⁻¹·J with J the reversal permutation — the upper Cholesky factor of H⁻¹
// with one Cholesky and one triangular inverse (the reference does chol → cholesky_inverse → chol;
// the factor is unique, so the result is the same up to rounding). Cost ~ (2/3)·in³ host flops per
// Hessian (shared by all Linears of one input group), seconds for in ≈ 3k.
// Backends: CPU = loops + cpu::gemm_f32 for the inter-block update; CUDA = one warp per weight row
// for the in-block column loop, cuBLASLt GEMMs for H accumulation and the inter-block update.
#pragma once
#include <cstdint>
#include <vector>

#include "models/decoder_block.h"
#include "ops/fake_quant.h"
#include "runtime/tensor.h"

namespace omniq {

struct GptqOptions {
  double percdamp = 0.01;     // dampening λ = percdamp·mean(diag H)
  int64_t block_size = 128;   // columns per lazy-update block
  bool act_order = false;     // columns in order of descending diag(H)
  bool static_groups = false; // group scale/zero fixed up front from the (dead-zeroed) original weight
};

// Quantizes one Linear. w: [out, in] f32 (CPU or CUDA); H: [in, in] f32 on w's device (not modified).
// Returns the fake-quantized weight (same shape/dtype/device as w).
Tensor gptq_quantize_linear(const Tensor& w, const Tensor& H, const WeightQuantSpec& spec, const GptqOptions& opt);

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
// weights: the block's weights, Linear weights f32, modified in place.
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

namespace cpu {
Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt);
}
#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt);
void gptq_accumulate_hessian(Tensor& H, const Tensor& x, float alpha, float beta);  // H = beta·H + alpha·XᵀX
}  // namespace cuda
#endif

}  // namespace omniq
