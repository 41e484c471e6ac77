#include "models/model_shapes.h"

#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace omniq {

namespace {

using nlohmann::json;

json llama(int64_t C, int64_t F, int64_t layers, int64_t heads, int64_t kv_heads, int64_t vocab, int64_t max_pos) {
  return json{{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", C},
              {"intermediate_size", F}, {"num_hidden_layers", layers}, {"num_attention_heads", heads},
              {"num_key_value_heads", kv_heads}, {"vocab_size", vocab}, {"max_position_embeddings", max_pos},
              {"rms_norm_eps", 1e-5}, {"hidden_act", "silu"}, {"rope_theta", 10000.0},
              {"tie_word_embeddings", false}, {"bos_token_id", 1}, {"eos_token_id", 2}};
}

json opt(int64_t C, int64_t F, int64_t layers, int64_t heads, int64_t vocab, int64_t max_pos) {
  return json{{"model_type", "opt"}, {"architectures", {"OPTForCausalLM"}}, {"hidden_size", C}, {"ffn_dim", F},
              {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"vocab_size", vocab},
              {"max_position_embeddings", max_pos}, {"word_embed_proj_dim", C}, {"activation_function", "relu"},
              {"do_layer_norm_before", true}, {"enable_bias", true}, {"layer_norm_elementwise_affine", true},
              {"tie_word_embeddings", false}, {"bos_token_id", 2}, {"eos_token_id", 2}, {"pad_token_id", 1}};
}

struct Preset {
  const char* name;
  json config;
};

const std::vector<Preset>& presets() {
  static const std::vector<Preset> p = {
      {"llama2-7b", llama(4096, 11008, 32, 32, 32, 32000, 2048)},
      {"llama2-13b", llama(5120, 13824, 40, 40, 40, 32000, 2048)},
      {"llama2-70b", llama(8192, 28672, 80, 64, 8, 32000, 2048)},
      {"opt-6.7b", opt(4096, 16384, 32, 32, 50272, 2048)},
      {"tiny", llama(64, 160, 2, 4, 2, 256, 128)},
      {"tiny-opt", opt(64, 256, 2, 4, 256, 128)},
  };
  return p;
}

}  // namespace

std::vector<std::string> model_shape_names() {
  std::vector<std::string> n;
  for (const Preset& p : presets()) n.push_back(p.name);
  return n;
}

bool has_model_shape(const std::string& name) {
  for (const Preset& p : presets())
    if (name == p.name) return true;
  return false;
}

ModelConfig model_shape(const std::string& name) {
  for (const Preset& p : presets())
    if (name == p.name) return ModelConfig::parse(p.config.dump(), "shape " + name);
  std::string known;
  for (const std::string& n : model_shape_names()) known += (known.empty() ? "" : ", ") + n;
  OMNIQ_FAIL("unknown model shape '%s' (known shapes: %s)", name.c_str(), known.c_str());
}

int64_t block_linear_params(const ModelConfig& cfg) {
  int64_t n = 0;
  for (const WeightSpec& s : block_weight_specs(cfg, 0))
    if (s.role == WeightRole::linear_weight) n += s.shape.numel();
  return n;
}

}  // namespace omniq
