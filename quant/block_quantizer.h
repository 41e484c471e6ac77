// OmniQuant's quantized block: the hooks that turn a decoder block into its quantized version.
//
//  * LET (spec §4): for every transform pair of the architecture, a per-channel scale s (and a
//    shift δ where the producer and consumers have bias paths, OPT weight-activation only) applied
//    *as it will be fused*: norm weights/biases or producer rows divided, consumer columns
//    multiplied, consumer biases += W·δ. So the block trained is exactly the block exported.
//  * LWC (spec §2): per weight group γ, β (init 4.0) shrinking the min-max range.
//  * Weight fake-quant on every Linear weight after the LET transform; per-token activation
//    fake-quant on every Linear input and on the attention operands q, k, v (weight-activation).
//
// Parameters are f32 on the block's device. The block weights given are the f32 originals; the
// Linear weights/biases the block computes with are in the compute dtype: a fake-quantized weight
// comes out of the quantizer in it directly (fp32 math, one rounding), the rest is cast.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "autograd/quant_functions.h"
#include "autograd/tape.h"
#include "models/decoder_block.h"
#include "quant/quant_config.h"

namespace omniq {

// Per-input-channel statistics of a Linear site's input over the calibration set (f32 [in]).
// absmean (AWQ's activation salience) is the mean of |x| over the `rows` tokens seen.
struct ChannelStats {
  Tensor absmax, min, max, absmean;
  int64_t rows = 0;
};

// Records ChannelStats of every Linear input while a (full-precision) block runs.
class ActivationStatsRecorder : public BlockHooks {
 public:
  ag::Var activation(ag::Tape& t, const std::string& site, const ag::Var& x) override;
  const std::map<std::string, ChannelStats>& stats() const { return stats_; }

 private:
  std::map<std::string, ChannelStats> stats_;
};

// One LWC parameter's optimizer state, handed to BlockQuantizer::enable_fused_lwc_update.
struct LwcAdamWSlot {
  ag::Var param;  // a γ or β of lwc_params()
  Tensor m, v;    // its AdamW moments (aliases of the optimizer's; updated in place)
  int64_t slot;   // its row in the optimizer's scalars buffer (detail::AdamWScalars, 7 floats)
};

// Which parameters a BlockQuantizer creates depends on qc.method:
//  * "omniquant": LWC (qc.lwc, γ = β = 4) and LET on every pair incl. qkt (qc.let), shifts on OPT W-A;
//  * "smoothquant": LET scales (no shifts) on the qkv, out, fc1 pairs, no LWC — set by init_smoothquant;
//  * "awq": the same scales plus LWC γ/β initialised to "no clipping" (σ(γ) = 1 in fp32), to be set
//    (not trained) by init_awq; the |s| floor is then 1e-5 instead of qc.let_scale_floor.
//  * anything else ("rtn"): plain fake-quant.
class BlockQuantizer : public BlockHooks {
 public:
  // `weights`: the block's original weights (Linear weights f32); `stats`: input statistics of the
  // Linear sites (needed when LET is on); compute: dtype the Linears run in.
  BlockQuantizer(const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& weights,
                 const std::map<std::string, ChannelStats>* stats, DType compute);

  ag::Var param(ag::Tape& t, const std::string& key, const ag::Var& p) override;
  ag::Var activation(ag::Tape& t, const std::string& site, const ag::Var& x) override;

  // Whether every LET-transformed Linear weight of this config goes through the fused LET +
  // fake-quant op (ops/fake_quant_let.h), which reads the original weight in any float dtype: the
  // calibration may then keep an f16 copy of fp16-exact weights, as without LET.
  static bool fuses_all_let(const ModelConfig& cfg, const QuantConfig& qc);

  // Trainable parameters by name ("q_proj.lwc_gamma", "qkv.let_scale", "out.let_shift", ...).
  std::map<std::string, ag::Var>& learned() { return learned_; }
  std::vector<ag::Var> lwc_params() const;
  std::vector<ag::Var> let_params() const;

  // Fused LWC step (ops/fake_quant_lwc_update.h), opt-in for the trainer: every quantized Linear
  // weight with LWC, no LET on it and a supported layout then takes ŵ from a persistent cache
  // (ag::fake_quant_weight_cached), and its backward updates γ, β, m, v in place (AdamW with the rows
  // `slot` of `scalars`) and refreshes the cache: γ, β get no gradient, the optimizer skips them.
  // The other weights keep the unfused path. Assumes each Linear weight is fetched once per step
  // (decoder_block_forward does): a second use would apply a second update in the same step.
  // Allocates and fills the caches (call it outside any
  // CUDA-graph capture); `slots` must hold both γ and β of a weight for it to be fused. Returns the
  // number of weights fused.
  int enable_fused_lwc_update(const std::vector<LwcAdamWSlot>& slots, const Tensor& scalars);
  // Recomputes every cache from the current γ, β (after the trainer restored a snapshot).
  void refresh_fused_lwc_cache();
  // Back to the unfused path; drops the caches and the aliases of the optimizer's state.
  void disable_fused_lwc_update() { fused_lwc_.clear(); }
  bool fused_lwc_enabled() const { return !fused_lwc_.empty(); }

  // The final block: LET fused into the weights, Linear weights fake-quantized (in `out_dtype`),
  // norm parameters f32. Computed without recording gradients.
  BlockWeights fused(const BlockWeights& weights, DType out_dtype);
  // LET fused but Linear weights NOT fake-quantized (what OmniQuant-then-GPTQ quantizes), in f32.
  BlockWeights fused_unquantized(const BlockWeights& weights);

 private:
  struct PairUse;  // how a key is touched by a transform pair
  // LET and weight fake-quant of one parameter; a fake-quantized Linear weight comes out in
  // `weight_dtype` (the fp32 ŵ rounded once), everything else in its own dtype.
  ag::Var transform(ag::Tape& t, const std::string& key, const ag::Var& p, DType weight_dtype);
  bool skip_weight_quant_ = false;  // set only inside fused_unquantized()
  ag::Var scale_of(ag::Tape& t, const std::string& pair_name, bool expand_to_q);
  ag::Var shift_of(const std::string& pair_name, bool expand_to_q) const;
  ag::Var linear_weight(ag::Tape& t, const std::string& site);  // original weight of a site (constant)
  std::pair<ag::Var, ag::Var> lwc_of(const std::string& site) const;  // (γ, β), or nulls without LWC
  // ŵ of a Linear weight with its LET scales through the fused op, or null where that op does not
  // apply (no LET on the weight, an unsupported layout): transform() then composes the ops.
  ag::Var fused_let_weight(ag::Tape& t, const std::string& site, const ag::Var& w, DType weight_dtype);
  // ŵ of a site from the fused LWC cache, or null where the site is not fused (or w / the dtype is not
  // the one cached): transform() then runs the unfused ops.
  ag::Var cached_lwc_weight(ag::Tape& t, const std::string& site, const ag::Var& w, DType weight_dtype);
  bool site_has_let(const std::string& site) const;

  const ModelConfig& cfg_;
  QuantConfig qc_;
  float let_floor_;  // |s| floor: qc.let_scale_floor for OmniQuant's training, tiny for fixed scales
  DType compute_;
  std::map<std::string, ag::Var> originals_;  // the block's original parameters (constants)
  std::vector<TransformPair> pairs_;
  std::map<std::string, bool> pair_has_shift_;
  std::map<std::string, ag::Var> learned_;
  Tensor kv_to_q_index_;     // i32 [Hq*D]: q channel -> kv channel (GQA expansion)
  Tensor rope_tie_index_;    // i32 [Hkv*D]: channel -> its free parameter (RoPE pairs tied)
  std::map<std::string, std::shared_ptr<ag::FusedLwcWeight>> fused_lwc_;  // site -> cache (fused LWC step)
  bool in_fused_ = false;  // set inside fused(): the final weights never come from the training cache
};

}  // namespace omniq
