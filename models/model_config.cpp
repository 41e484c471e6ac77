#include "models/model_config.h"

#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/error.h"

namespace omniq {

using nlohmann::json;

const char* model_arch_name(ModelArch a) { return a == ModelArch::llama ? "llama" : "opt"; }

namespace {

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  if (s.size() > 240) s = s.substr(0, 240) + "...";  // parser messages quote the input they choked on
  return s;
}

// Typed access to config.json keys with transformers' convention that a missing key and `null`
// both mean "use the default". Every message names the file and the key.
class Keys {
 public:
  Keys(const json& j, const std::string& src, const std::string& type) : j_(j), src_(src), type_(type) {}

  bool present(const char* k) const {
    auto it = j_.find(k);
    return it != j_.end() && !it->is_null();
  }
  const json& at(const char* k) const { return *j_.find(k); }

  int64_t integer(const char* k) const {
    OMNIQ_CHECK(present(k), "%s: key '%s' is required for model_type '%s' but is missing", src_.c_str(), k,
                type_.c_str());
    return as_int(k, at(k));
  }
  int64_t integer(const char* k, int64_t def) const { return present(k) ? as_int(k, at(k)) : def; }
  double number(const char* k, double def) const {
    if (!present(k)) return def;
    OMNIQ_CHECK(at(k).is_number(), "%s: key '%s' must be a number, got %s %s", src_.c_str(), k, at(k).type_name(),
                at(k).dump().c_str());
    return at(k).get<double>();
  }
  bool boolean(const char* k, bool def) const {
    if (!present(k)) return def;
    OMNIQ_CHECK(at(k).is_boolean(), "%s: key '%s' must be true or false, got %s %s", src_.c_str(), k,
                at(k).type_name(), at(k).dump().c_str());
    return at(k).get<bool>();
  }
  std::string string(const char* k, const std::string& def) const {
    if (!present(k)) return def;
    OMNIQ_CHECK(at(k).is_string(), "%s: key '%s' must be a string, got %s %s", src_.c_str(), k, at(k).type_name(),
                at(k).dump().c_str());
    return at(k).get<std::string>();
  }
  // A size: an integer > 0.
  int64_t positive(const char* k) const {
    int64_t v = integer(k);
    OMNIQ_CHECK(v > 0, "%s: key '%s' must be > 0, got %lld", src_.c_str(), k, static_cast<long long>(v));
    return v;
  }
  // Token ids: an integer, a list of integers (eos of LLaMA-3 style configs), or null. Here null
  // means "no such token" (None in transformers), unlike a missing key, which takes the default.
  std::vector<int64_t> ids(const char* k, std::vector<int64_t> def) const {
    if (j_.find(k) == j_.end()) return def;
    if (!present(k)) return {};
    if (!at(k).is_array()) return {as_int(k, at(k))};
    std::vector<int64_t> out;
    for (const json& v : at(k)) out.push_back(as_int(k, v));
    return out;
  }

 private:
  int64_t as_int(const char* k, const json& v) const {
    // Python's json never writes 256 as 256.0, but hand-edited files may: accept integral floats.
    bool ok = v.is_number_integer() || (v.is_number_float() && v.get<double>() == static_cast<double>(
                                                                                        static_cast<int64_t>(v.get<double>())));
    OMNIQ_CHECK(ok, "%s: key '%s' must be an integer, got %s %s", src_.c_str(), k, v.type_name(), v.dump().c_str());
    return v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>());
  }
  const json& j_;
  const std::string& src_;
  const std::string& type_;
};

// RoPE variants other than the plain one change the math; refuse them by name.
void check_rope_type(const json& obj, const char* where, const std::string& src) {
  std::string type = "default";
  for (const char* k : {"rope_type", "type"}) {
    auto it = obj.find(k);
    if (it != obj.end() && !it->is_null()) {
      OMNIQ_CHECK(it->is_string(), "%s: key '%s.%s' must be a string, got %s", src.c_str(), where, k,
                  it->dump().c_str());
      type = it->get<std::string>();
      break;
    }
  }
  OMNIQ_CHECK(type == "default",
              "%s: key '%s' asks for RoPE type '%s', which omniq does not support (supported: 'default', i.e. no "
              "rope scaling)",
              src.c_str(), where, type.c_str());
}

void parse_llama(const Keys& k, ModelConfig& c) {
  const char* src = c.source.c_str();
  c.intermediate_size = k.positive("intermediate_size");
  c.num_kv_heads = k.integer("num_key_value_heads", c.num_heads);
  OMNIQ_CHECK(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0,
              "%s: key 'num_key_value_heads' = %lld must be > 0 and divide num_attention_heads = %lld", src,
              static_cast<long long>(c.num_kv_heads), static_cast<long long>(c.num_heads));
  if (k.present("head_dim")) {
    c.head_dim = k.integer("head_dim");
  } else {
    OMNIQ_CHECK(c.hidden_size % c.num_heads == 0,
                "%s: key 'num_attention_heads' = %lld does not divide hidden_size = %lld (and no head_dim is given)",
                src, static_cast<long long>(c.num_heads), static_cast<long long>(c.hidden_size));
    c.head_dim = c.hidden_size / c.num_heads;
  }
  OMNIQ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "%s: key 'head_dim' = %lld must be a positive even number (RoPE rotates pairs)",
              src, static_cast<long long>(c.head_dim));
  std::string act = k.string("hidden_act", "silu");
  OMNIQ_CHECK(act == "silu", "%s: key 'hidden_act' = '%s' is not supported for llama (supported: silu)", src,
              act.c_str());
  c.norm_eps = static_cast<float>(k.number("rms_norm_eps", 1e-6));
  OMNIQ_CHECK(c.norm_eps > 0, "%s: key 'rms_norm_eps' must be > 0", src);
  c.attention_bias = k.boolean("attention_bias", false);
  c.mlp_bias = k.boolean("mlp_bias", false);
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", false);  // LlamaConfig's default

  // RoPE: transformers >= 5 writes rope_parameters {rope_type, rope_theta}; older versions write
  // rope_theta (default 1e4) and rope_scaling (null unless scaled).
  c.rope_theta = k.number("rope_theta", 10000.0);
  if (k.present("rope_scaling")) {
    OMNIQ_CHECK(k.at("rope_scaling").is_object(), "%s: key 'rope_scaling' must be an object or null, got %s", src,
                k.at("rope_scaling").dump().c_str());
    check_rope_type(k.at("rope_scaling"), "rope_scaling", c.source);
  }
  if (k.present("rope_parameters")) {
    const json& rp = k.at("rope_parameters");
    OMNIQ_CHECK(rp.is_object(), "%s: key 'rope_parameters' must be an object, got %s", src, rp.dump().c_str());
    check_rope_type(rp, "rope_parameters", c.source);
    Keys rk(rp, c.source, c.model_type);
    c.rope_theta = rk.number("rope_theta", c.rope_theta);
  }
  OMNIQ_CHECK(c.rope_theta > 0, "%s: key 'rope_theta' must be > 0", src);
  std::vector<int64_t> bos = k.ids("bos_token_id", {1});
  c.bos_token_id = bos.empty() ? -1 : bos[0];
  c.eos_token_ids = k.ids("eos_token_id", {2});
}

void parse_opt(const Keys& k, ModelConfig& c) {
  const char* src = c.source.c_str();
  c.intermediate_size = k.positive("ffn_dim");
  OMNIQ_CHECK(c.hidden_size % c.num_heads == 0,
              "%s: key 'num_attention_heads' = %lld does not divide hidden_size = %lld", src,
              static_cast<long long>(c.num_heads), static_cast<long long>(c.hidden_size));
  c.num_kv_heads = c.num_heads;
  c.head_dim = c.hidden_size / c.num_heads;
  std::string act = k.string("activation_function", "relu");
  OMNIQ_CHECK(act == "relu", "%s: key 'activation_function' = '%s' is not supported for opt (supported: relu)", src,
              act.c_str());
  c.do_layer_norm_before = k.boolean("do_layer_norm_before", true);
  c.enable_bias = k.boolean("enable_bias", true);
  c.layer_norm_elementwise_affine = k.boolean("layer_norm_elementwise_affine", true);
  c.remove_final_layer_norm = k.boolean("_remove_final_layer_norm", false);
  c.word_embed_proj_dim = k.integer("word_embed_proj_dim", c.hidden_size);
  OMNIQ_CHECK(c.word_embed_proj_dim > 0, "%s: key 'word_embed_proj_dim' must be > 0", src);
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", true);  // OPTConfig's default
  c.norm_eps = 1e-5f;        // nn.LayerNorm's default; OPT has no eps key
  c.position_offset = 2;     // OPTLearnedPositionalEmbedding: row = position + 2 (fairseq legacy)
  std::vector<int64_t> bos = k.ids("bos_token_id", {2});
  c.bos_token_id = bos.empty() ? -1 : bos[0];
  c.eos_token_ids = k.ids("eos_token_id", {2});
}

}  // namespace

bool ModelConfig::has_final_norm() const { return is_llama() || (do_layer_norm_before && !remove_final_layer_norm); }

std::string ModelConfig::summary() const {
  return strformat("%s: %lld layers, hidden %lld, heads %lld (kv %lld) x %lld, mlp %lld, vocab %lld, max pos %lld%s",
                   model_type.c_str(), static_cast<long long>(num_layers), static_cast<long long>(hidden_size),
                   static_cast<long long>(num_heads), static_cast<long long>(num_kv_heads),
                   static_cast<long long>(head_dim), static_cast<long long>(intermediate_size),
                   static_cast<long long>(vocab_size), static_cast<long long>(max_position_embeddings),
                   tie_word_embeddings ? ", tied lm_head" : "");
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    OMNIQ_FAIL("%s: not valid JSON (%s)", source.c_str(), one_line(e.what()).c_str());
  }
  OMNIQ_CHECK(j.is_object(), "%s: must be a JSON object, got %s", source.c_str(), j.type_name());
  ModelConfig c;
  c.source = source;
  const char* src = source.c_str();
  auto mt = j.find("model_type");
  OMNIQ_CHECK(mt != j.end() && mt->is_string(),
              "%s: key 'model_type' (a string) is missing; omniq supports model_type 'llama' and 'opt'", src);
  c.model_type = mt->get<std::string>();
  if (c.model_type == "llama") {
    c.arch = ModelArch::llama;
  } else if (c.model_type == "opt") {
    c.arch = ModelArch::opt;
  } else {
    OMNIQ_FAIL("%s: model_type '%s' is not supported (omniq supports: llama, opt)", src, c.model_type.c_str());
  }
  Keys k(j, source, c.model_type);
  c.vocab_size = k.positive("vocab_size");
  c.hidden_size = k.positive("hidden_size");
  c.num_layers = k.positive("num_hidden_layers");
  c.num_heads = k.positive("num_attention_heads");
  c.max_position_embeddings = k.positive("max_position_embeddings");
  std::vector<int64_t> pad = k.ids("pad_token_id", {});
  c.pad_token_id = pad.empty() ? -1 : pad[0];
  c.torch_dtype = k.present("dtype") ? k.string("dtype", "") : k.string("torch_dtype", "");
  if (c.is_llama()) {
    parse_llama(k, c);
  } else {
    parse_opt(k, c);
  }
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  OMNIQ_CHECK(in.good(), "%s: cannot open the model config (a Hugging Face model folder needs config.json)",
              path.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

ModelConfig ModelConfig::from_dir(const std::string& model_dir) {
  struct stat st;
  OMNIQ_CHECK(::stat(model_dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "%s: no such model directory",
              model_dir.c_str());
  return from_file(model_dir + "/config.json");
}

// ---------------------------------------------------------------------------------------------
// weight layout

DType weight_role_dtype(WeightRole role, DType compute) {
  return (role == WeightRole::norm_weight || role == WeightRole::norm_bias) ? DType::f32 : compute;
}

namespace {

// Appends `<site>.weight` (+ `<site>.bias`) of a Linear [out, in].
void add_linear(std::vector<WeightSpec>& v, const std::string& prefix, const std::string& hf_site,
                const std::string& site, int64_t out, int64_t in, const std::string& why_out,
                const std::string& why_in, bool bias) {
  v.push_back({site + ".weight", prefix + hf_site + ".weight", Shape{out, in}, "[" + why_out + ", " + why_in + "]",
               WeightRole::linear_weight, true});
  if (bias) v.push_back({site + ".bias", prefix + hf_site + ".bias", Shape{out}, "[" + why_out + "]",
                         WeightRole::linear_bias, true});
}

void add_norm(std::vector<WeightSpec>& v, const std::string& prefix, const std::string& name, int64_t c,
              bool with_bias, bool stored) {
  v.push_back({name + ".weight", prefix + name + ".weight", Shape{c}, "[hidden_size]", WeightRole::norm_weight, stored});
  if (with_bias)
    v.push_back({name + ".bias", prefix + name + ".bias", Shape{c}, "[hidden_size]", WeightRole::norm_bias, stored});
}

}  // namespace

std::vector<WeightSpec> block_weight_specs(const ModelConfig& c, int64_t layer) {
  OMNIQ_CHECK(layer >= 0 && layer < c.num_layers, "block %lld out of range: %s has num_hidden_layers = %lld",
              static_cast<long long>(layer), c.source.c_str(), static_cast<long long>(c.num_layers));
  std::vector<WeightSpec> v;
  const int64_t C = c.hidden_size, F = c.intermediate_size;
  if (c.is_llama()) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    add_norm(v, p, "input_layernorm", C, false, true);
    add_linear(v, p, "self_attn.q_proj", "q_proj", c.q_dim(), C, "num_attention_heads*head_dim", "hidden_size", ab);
    add_linear(v, p, "self_attn.k_proj", "k_proj", c.kv_dim(), C, "num_key_value_heads*head_dim", "hidden_size", ab);
    add_linear(v, p, "self_attn.v_proj", "v_proj", c.kv_dim(), C, "num_key_value_heads*head_dim", "hidden_size", ab);
    add_linear(v, p, "self_attn.o_proj", "o_proj", C, c.q_dim(), "hidden_size", "num_attention_heads*head_dim", ab);
    add_norm(v, p, "post_attention_layernorm", C, false, true);
    add_linear(v, p, "mlp.gate_proj", "gate_proj", F, C, "intermediate_size", "hidden_size", mb);
    add_linear(v, p, "mlp.up_proj", "up_proj", F, C, "intermediate_size", "hidden_size", mb);
    add_linear(v, p, "mlp.down_proj", "down_proj", C, F, "hidden_size", "intermediate_size", mb);
  } else {
    const std::string p = "model.decoder.layers." + std::to_string(layer) + ".";
    const bool b = c.enable_bias, affine = c.layer_norm_elementwise_affine;
    add_norm(v, p, "self_attn_layer_norm", C, true, affine);
    for (const char* s : {"q_proj", "k_proj", "v_proj", "out_proj"})
      add_linear(v, p, std::string("self_attn.") + s, s, C, C, "hidden_size", "hidden_size", b);
    add_norm(v, p, "final_layer_norm", C, true, affine);
    add_linear(v, p, "fc1", "fc1", F, C, "ffn_dim", "hidden_size", b);
    add_linear(v, p, "fc2", "fc2", C, F, "hidden_size", "ffn_dim", b);
  }
  return v;
}

std::vector<WeightSpec> embedding_weight_specs(const ModelConfig& c) {
  std::vector<WeightSpec> v;
  if (c.is_llama()) {
    v.push_back({"embed_tokens.weight", "model.embed_tokens.weight", Shape{c.vocab_size, c.hidden_size},
                 "[vocab_size, hidden_size]", WeightRole::embedding, true});
    return v;
  }
  const std::string p = "model.decoder.";
  v.push_back({"embed_tokens.weight", p + "embed_tokens.weight", Shape{c.vocab_size, c.word_embed_proj_dim},
               "[vocab_size, word_embed_proj_dim]", WeightRole::embedding, true});
  v.push_back({"embed_positions.weight", p + "embed_positions.weight",
               Shape{c.max_position_embeddings + c.position_offset, c.hidden_size},
               "[max_position_embeddings + 2, hidden_size]", WeightRole::embedding, true});
  if (c.has_project_in_out())
    add_linear(v, p, "project_in", "project_in", c.hidden_size, c.word_embed_proj_dim, "hidden_size",
               "word_embed_proj_dim", false);
  return v;
}

std::vector<WeightSpec> head_weight_specs(const ModelConfig& c) {
  std::vector<WeightSpec> v;
  int64_t lm_in = c.hidden_size;
  std::string lm_why = "[vocab_size, hidden_size]";
  std::string embed = "model.embed_tokens.weight";
  if (c.is_llama()) {
    add_norm(v, "model.", "norm", c.hidden_size, false, true);
  } else {
    const std::string p = "model.decoder.";
    if (c.has_final_norm()) add_norm(v, p, "final_layer_norm", c.hidden_size, true, c.layer_norm_elementwise_affine);
    if (c.has_project_in_out())
      add_linear(v, p, "project_out", "project_out", c.word_embed_proj_dim, c.hidden_size, "word_embed_proj_dim",
                 "hidden_size", false);
    lm_in = c.word_embed_proj_dim;
    lm_why = "[vocab_size, word_embed_proj_dim]";
    embed = p + "embed_tokens.weight";
  }
  // Tied: transformers ties lm_head to the embedding and ignores a stored lm_head.weight.
  v.push_back({"lm_head.weight", c.tie_word_embeddings ? embed : "lm_head.weight", Shape{c.vocab_size, lm_in}, lm_why,
               WeightRole::linear_weight, true});
  return v;
}

}  // namespace omniq
