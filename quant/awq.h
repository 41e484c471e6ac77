// AWQ (Lin et al. 2023) as an omniq method: activation-aware per-channel scales found by a grid
// search on the block output, then a per-group clipping search on each Linear, then RTN.
//
// Everything lives in a BlockQuantizer constructed with qc.method = "awq": the scales are its LET
// scales on the qkv, out, fc1 pairs (no qkt, no shifts) and the clipping ratios its LWC γ/β, set to
// fixed values (σ(γ) = r) rather than trained. bq.fused() then gives the exported block.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "quant/block_quantizer.h"

namespace omniq {

struct AwqReport {
  std::map<std::string, double> alpha;                            // pair -> chosen α
  std::map<std::string, std::vector<double>> loss_per_alpha;      // pair -> block MSE at α = i/20
};

// 1. Scales: for each pair in forward order (qkv, out, fc1; later pairs at s = 1, earlier at their
//    chosen s), s = max(mean|X|, 1e-4)^α per input channel (mean|X| = stats[first consumer].absmean,
//    recorded by ActivationStatsRecorder), normalised s / sqrt(max(s)·min(s)) as the AWQ code does,
//    α ∈ {0, 0.05, ..., 0.95}; the α with the lowest mean-over-samples MSE between the fused,
//    weight-fake-quantized block (no clipping yet; activations quantized as bq would if abits < 16)
//    run on `inps` and `fp_outs` is kept (ties: the smaller α).
// 2. Clipping: the transformed (scaled, unquantized) block is run on up to 8 samples, ≤ 1024 input
//    tokens of every Linear are kept; for every weight group the ratio r ∈ {1, 0.975, ..., 0.5}
//    minimising ‖X_g (w_g − ŵ_g(r))ᵀ‖² over those tokens is chosen (per group, as the AWQ code) and
//    set as γ = β = logit(r) (r = 1: γ = 30, σ rounds to 1.0f).
// `w` must be the f32 block weights bq was built from; `params` is accepted for the agreed interface
// (the searches run the fused block, which needs no tape). inps / fp_outs: [N, T, C] in the compute dtype.
AwqReport init_awq(BlockQuantizer& bq, const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w,
                   const std::map<std::string, ag::Var>& params, const Tensor& inps, const Tensor& fp_outs,
                   const std::map<std::string, ChannelStats>& stats);

// AWQ's normalised scale for one α: s_i = max(m_i, 1e-4)^α / sqrt(max_j s_j · min_j s_j).
std::vector<float> awq_scale(const std::vector<float>& absmean, double alpha);

// Mean over the N samples of MSE(block(inps_j), fp_outs_j) for the block `fused` (activations
// fake-quantized per token when abits < 16). Shared with the tests.
double block_output_mse(const ModelConfig& cfg, const BlockWeights& fused, const Tensor& inps, const Tensor& fp_outs,
                        int abits);

}  // namespace omniq
