// The decoder block of each supported architecture, written once on top of autograd so the same
// code serves evaluation (nothing requires grad: the tape records nothing) and calibration
// (quantization parameters require grad).
//
// A block names its Linear layers as *sites* ("q_proj", ..., "down_proj"; OPT "out_proj", "fc1",
// "fc2") and reaches every parameter through `BlockHooks::param`, every Linear input through
// `BlockHooks::activation`: that is how quantization methods (fake-quant, LWC, LET, activation
// quantizers) act on a block without the block knowing about them.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "autograd/tape.h"
#include "models/checkpoint.h"
#include "models/model_config.h"

namespace omniq {

struct BlockHooks {
  virtual ~BlockHooks() = default;
  // Every parameter the block uses, by its key in the block ("q_proj.weight",
  // "input_layernorm.weight", "fc1.bias", ...): returns what the block computes with.
  virtual ag::Var param(ag::Tape& t, const std::string& key, const ag::Var& p) { return p; }
  // The input of Linear site `site` ("q_proj", ...), and the attention operands "q", "k" (after
  // RoPE for LLaMA) and "v" ([B,T,H,D]): returns what the block uses instead.
  virtual ag::Var activation(ag::Tape& t, const std::string& site, const ag::Var& x) { return x; }
};

// Linear sites of a block in forward order.
std::vector<std::string> block_linear_sites(const ModelConfig& cfg);

// An equivalent-transform pair of the architecture (OmniQuant's LET, SmoothQuant/AWQ scaling):
// the producer's output channels are divided by a per-channel scale s (and shifted by δ where the
// producer has a bias path), the consumers' input columns multiplied by s, so the block computes
// the same function. Facts of the architecture, kept here as data.
struct TransformPair {
  enum class Kind {
    norm_to_linears,   // producer: a norm (weight, and bias for LayerNorm); consumers' columns · s
    rows_to_columns,   // producer: a Linear's output rows (v_proj); consumer: o_proj/out_proj columns
    q_rows_to_k_rows,  // q_proj rows ÷ s, k_proj rows · s: QKᵀ unchanged
  };
  std::string name;                    // "qkv", "out", "fc1", "qkt"
  Kind kind;
  std::string producer;                // norm key prefix ("input_layernorm") or Linear site ("v_proj", "q_proj")
  std::vector<std::string> consumers;  // Linear sites
  int64_t channels = 0;                // length of s (producer output channels; for GQA the kv width)
  bool producer_has_bias = false;      // a shift δ can be absorbed
};
std::vector<TransformPair> block_transform_pairs(const ModelConfig& cfg);

// Wraps loaded block weights as constant Vars (views, no copies), keyed like the weights.
std::map<std::string, ag::Var> block_params(const BlockWeights& w);

// x [B, T, C] -> [B, T, C]. Positions are 0..T-1 (one window). hooks may be null.
ag::Var decoder_block_forward(ag::Tape& t, const ModelConfig& cfg, const std::map<std::string, ag::Var>& params,
                              const ag::Var& x, BlockHooks* hooks = nullptr);

// Convenience for evaluation: no gradients, plain tensors.
Tensor decoder_block_forward(const ModelConfig& cfg, const BlockWeights& w, const Tensor& x);

}  // namespace omniq
