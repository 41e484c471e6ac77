// A whole causal language model for evaluation: embeddings, decoder blocks, final norm and
// lm_head, all resident on one device in the compute dtype (norm parameters in f32).
// Calibration does not use this class: it streams one block at a time through ModelCheckpoint.
#pragma once
#include <string>
#include <vector>

#include "models/checkpoint.h"
#include "models/decoder_block.h"
#include "models/model_config.h"
#include "runtime/tensor.h"

namespace omniq {

// Token (+ OPT position) embeddings of ids [B, T] -> [B, T, C] on `dev`, from the tensors of
// ModelCheckpoint::load_embeddings. Positions are 0..T-1 for every row.
Tensor embed_tokens(const ModelConfig& cfg, const NamedWeights& embeddings, const Tensor& ids, Device dev);

class CausalLM {
 public:
  // Loads every tensor of `model_dir` as `compute` on `dev`.
  CausalLM(const std::string& model_dir, DType compute, Device dev);

  const ModelConfig& config() const { return config_; }
  DType compute_dtype() const { return compute_; }
  Device device() const { return device_; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  BlockWeights& block(int64_t i) { return blocks_.at(static_cast<size_t>(i)); }

  // ids: i32 [B, T] (any device) -> hidden states [B, T, C] on the model's device.
  Tensor embed(const Tensor& ids) const;
  // hidden [B, T, C] -> logits [B, T, V] in the compute dtype.
  Tensor head(const Tensor& hidden) const;
  Tensor block_forward(int64_t i, const Tensor& x) const;
  // Hooks applied in every block (e.g. activation quantizers of a weight-activation model); null: none.
  void set_block_hooks(BlockHooks* hooks) { hooks_ = hooks; }
  Tensor forward(const Tensor& ids) const;  // logits [B, T, V]

 private:
  ModelConfig config_;
  DType compute_;
  Device device_;
  NamedWeights embeddings_;
  std::vector<BlockWeights> blocks_;
  NamedWeights head_;
  BlockHooks* hooks_ = nullptr;
};

}  // namespace omniq
