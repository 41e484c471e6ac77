// A Hugging Face `config.json` read into a typed struct, and the weight layout it implies.
//
// Supported `model_type`s: "llama" (LlamaForCausalLM / LlamaModel) and "opt" (OPTForCausalLM /
// OPTModel). Keys follow transformers' names and defaults (LlamaConfig / OPTConfig); options that
// change the math in ways omniq does not implement (rope scaling, other activations) are errors
// that say so, never silently ignored.
//
// The weight layout (which tensors a decoder block has, their Hugging Face names and shapes) is
// data: `block_weight_specs` / `embedding_weight_specs` / `head_weight_specs` list it once per
// architecture, and the loader, the shape checks and the error messages all read these lists.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace omniq {

enum class ModelArch { llama, opt };
const char* model_arch_name(ModelArch a);

struct ModelConfig {
  std::string source;  // path of the config.json (for messages)
  ModelArch arch = ModelArch::llama;
  std::string model_type;  // "llama" | "opt"

  // ---- shared ----
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // C
  int64_t intermediate_size = 0;  // MLP width: LLaMA intermediate_size, OPT ffn_dim
  int64_t num_layers = 0;         // num_hidden_layers
  int64_t num_heads = 0;          // H
  int64_t num_kv_heads = 0;       // GQA groups (LLaMA num_key_value_heads; = num_heads for OPT)
  int64_t head_dim = 0;           // D (LLaMA head_dim or hidden/heads; OPT hidden/heads)
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens (lm_head.weight not read)
  float norm_eps = 1e-5f;            // LLaMA rms_norm_eps; OPT LayerNorm's fixed 1e-5
  int64_t bos_token_id = -1;         // -1: none
  std::vector<int64_t> eos_token_ids;
  int64_t pad_token_id = -1;
  std::string torch_dtype;  // "float16", "bfloat16", ... ("dtype" or "torch_dtype"); "" when absent

  // ---- LLaMA ----
  double rope_theta = 10000.0;  // rope_theta or rope_parameters.rope_theta
  bool attention_bias = false;  // q/k/v/o have biases
  bool mlp_bias = false;        // gate/up/down have biases

  // ---- OPT ----
  bool do_layer_norm_before = true;  // pre-LN (all sizes except 350m); false: post-LN
  bool enable_bias = true;           // every Linear has a bias
  bool layer_norm_elementwise_affine = true;  // LayerNorms have weight/bias tensors
  bool remove_final_layer_norm = false;       // `_remove_final_layer_norm` (pre-v4.20 fine-tunes)
  int64_t word_embed_proj_dim = 0;  // embedding width; project_in/out exist when != hidden_size
  int64_t position_offset = 0;      // OPT: 2 (positions table row = position + 2); LLaMA: 0

  bool is_llama() const { return arch == ModelArch::llama; }
  bool is_opt() const { return arch == ModelArch::opt; }
  // OPT: a final LayerNorm after the last block exists iff do_layer_norm_before and not
  // _remove_final_layer_norm (as in transformers' OPTDecoder). LLaMA: always (model.norm).
  bool has_final_norm() const;
  bool has_project_in_out() const { return is_opt() && word_embed_proj_dim != hidden_size; }
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  std::string summary() const;  // one line, for logs

  // Parse a config.json text; `source` names it in messages.
  static ModelConfig parse(const std::string& json_text, const std::string& source);
  static ModelConfig from_file(const std::string& path);
  static ModelConfig from_dir(const std::string& model_dir);  // <dir>/config.json
};

// ---- weight layout -------------------------------------------------------------------------

enum class WeightRole {
  linear_weight,  // [out, in], loaded in the compute dtype
  linear_bias,    // [out], compute dtype
  norm_weight,    // [C], always f32 (norm ops take f32 parameters)
  norm_bias,      // [C], always f32
  embedding,      // token / position tables, compute dtype
};
// The dtype a tensor of this role is loaded in, given the compute dtype.
DType weight_role_dtype(WeightRole role, DType compute);

struct WeightSpec {
  std::string key;      // name inside its group: "q_proj.weight", "input_layernorm.weight", "lm_head.weight"
  std::string hf_name;  // canonical Hugging Face name: "model.layers.3.self_attn.q_proj.weight"
  Shape shape;          // what config.json implies
  std::string why;      // the shape in config terms: "[num_attention_heads*head_dim, hidden_size]"
  WeightRole role = WeightRole::linear_weight;
  // false: the tensor is not in checkpoints of this config and is synthesized (OPT LayerNorm with
  // layer_norm_elementwise_affine=false: weight = 1, bias = 0), so the forward needs no special case.
  bool stored = true;
};

// Tensors of decoder block i, in forward order. Keys:
//   LLaMA: input_layernorm.weight, {q,k,v,o}_proj.weight (+ .bias if attention_bias),
//          post_attention_layernorm.weight, {gate,up,down}_proj.weight (+ .bias if mlp_bias)
//   OPT:   self_attn_layer_norm.{weight,bias}, {q,k,v,out}_proj.{weight,bias},
//          final_layer_norm.{weight,bias}, fc1.{weight,bias}, fc2.{weight,bias} (biases iff enable_bias)
std::vector<WeightSpec> block_weight_specs(const ModelConfig& cfg, int64_t layer);
// Before the first block. LLaMA: embed_tokens.weight. OPT: embed_tokens.weight,
// embed_positions.weight [max_position_embeddings + 2, C], project_in.weight when present.
std::vector<WeightSpec> embedding_weight_specs(const ModelConfig& cfg);
// After the last block, in forward order. LLaMA: norm.weight, lm_head.weight. OPT:
// final_layer_norm.{weight,bias} when has_final_norm(), project_out.weight when present,
// lm_head.weight. With tied embeddings lm_head.weight's hf_name is the embed_tokens tensor.
std::vector<WeightSpec> head_weight_specs(const ModelConfig& cfg);

}  // namespace omniq
