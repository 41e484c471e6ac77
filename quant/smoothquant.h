// SmoothQuant (Xiao et al. 2022) as an omniq method: migrate activation outliers into the weights
// with a fixed per-channel scale, then plain per-token activation / per-channel weight RTN.
//
// The scales live in a BlockQuantizer constructed with qc.method = "smoothquant" (LET scales on the
// qkv, out, fc1 pairs, no shifts, no LWC); the block is then fused and quantized exactly like
// OmniQuant's, so the transform is the same code path that OmniQuant trains and exports.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "quant/block_quantizer.h"

namespace omniq {

// For the qkv and fc1 pairs, and the out pair (v_proj rows → o_proj columns, exact on both OPT and
// LLaMA incl. GQA), s = clamp(max|X|^α / max|W|^(1−α), min 1e-5) per input channel, where max|X|
// is stats[first consumer].absmax, max|W| the column abs-max over all consumers (both floored at
// 1e-5) and α = qc.let_alpha; set into bq.learned()["<pair>.let_scale"]. No training.
void init_smoothquant(BlockQuantizer& bq, const ModelConfig& cfg, const QuantConfig& qc,
                      const BlockWeights& w, const std::map<std::string, ChannelStats>& stats);

// A per-input-channel statistic of pair `p`'s consumers' input brought to the pair's channels: the
// out pair's statistics are over o_proj's H·D inputs while its scale lives on v_proj's Hkv·D rows
// (GQA), so the query heads sharing a kv head are reduced (max, or mean when `mean`).
std::vector<float> pair_channel_stat(const ModelConfig& cfg, const TransformPair& p, const std::vector<float>& v,
                                     bool mean);

}  // namespace omniq
