// OmniQuant's per-block training loop (spec §5.3c): epochs × samples, loss = MSE(block_q(q_in_j),
// fp_out_j) (+ aug loss MSE(block_q(q_in_j), block_fp(q_in_j))), AdamW on the LWC and LET
// parameters with their own learning rates, batch 1, no schedule, no clipping.
//
// Per-sample losses stay on the device and are read once per epoch (no host sync in the inner
// loop). A non-finite loss is found at the end of its epoch: the trainer reports block, epoch and
// the first bad sample, restores the parameters and optimizer state from the start of the epoch,
// halves both learning rates and runs the epoch again, at most `max_nan_retries` times; then it
// throws. Non-finite parameters are never kept.
//
// On CUDA the LWC parameters of weights without LET are updated by the fused LWC step (fake-quant
// backward + AdamW + the next step's forward in one kernel per weight, ops/fake_quant_lwc_update.h;
// same bits as the unfused ops); OMNIQ_NO_FUSED_LWC=1 runs the unfused ops (A/B switch), and
// OMNIQ_FUSED_LWC_PER_CHANNEL=0 only for per-channel configs (group size 0; see block_trainer.cpp).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "models/decoder_block.h"
#include "quant/block_quantizer.h"
#include "quant/quant_config.h"

namespace omniq {

struct BlockTrainingResult {
  std::vector<double> epoch_loss;  // mean loss of each epoch (after retries)
  int nan_retries = 0;
  int64_t graph_steps = 0;  // steps run as CUDA graph replays (0 on the CPU or with OMNIQ_NO_CUDA_GRAPH)
  int fused_lwc_weights = 0;  // Linears trained with the fused LWC step (0 on the CPU, OMNIQ_NO_FUSED_LWC=1)
  std::vector<std::string> warnings;  // one line per recovered NaN/Inf
};

struct BlockTrainingData {
  const Tensor* q_inps = nullptr;    // [N, T, C] inputs from the quantized model so far
  const Tensor* fp_outs = nullptr;   // [N, T, C] full-precision block outputs (targets)
  const Tensor* aug_outs = nullptr;  // [N, T, C] block_fp(q_inps) when aug_loss, else null
  // Fault injection for tests: when set and true for (epoch, attempt), that attempt's first sample
  // loss is taken as non-finite, so the restore / halved-rate retry path runs on real parameters.
  std::function<bool(int epoch, int attempt)> poison_loss = nullptr;
};

// `params`: the block's parameters (original weights, f32 Linear weights) as Vars.
// `on_epoch(epoch, loss)` is called after every epoch (progress bars, logs).
BlockTrainingResult train_block(const ModelConfig& cfg, const QuantConfig& qc,
                                const std::map<std::string, ag::Var>& params, BlockQuantizer& bq,
                                const BlockTrainingData& data, int64_t block_index,
                                const std::function<void(int, double)>& on_epoch = {});

}  // namespace omniq
