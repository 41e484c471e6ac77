// config.json parsing (values, transformers' defaults, every refusal) and the weight layout it implies.
#include <nlohmann/json.hpp>

#include "models/model_config.h"
#include "runtime/error.h"
#include "tests/models_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using nlohmann::json;
using omniq::test::throws_with;

namespace {

const char* kSrc = "some/model/config.json";

json nano(const char* m) {
  return json::parse(test::read_file_bytes(test::source_path(std::string("data/models/") + m + "/config.json")));
}
ModelConfig parse(const json& j) { return ModelConfig::parse(j.dump(), kSrc); }

// The keys of meta-llama/Llama-2-7b-hf's config.json: no rope_theta, head_dim or attention_bias.
json llama2_7b() {
  return json::parse(R"({"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "float16", "vocab_size": 32000})");
}
// The keys of facebook/opt-350m: post-LN, 512-wide embeddings projected to 1024, no enable_bias.
json opt350m() {
  return json::parse(R"({"_remove_final_layer_norm": false, "activation_function": "relu",
    "bos_token_id": 2, "do_layer_norm_before": false, "eos_token_id": 2, "ffn_dim": 4096,
    "hidden_size": 1024, "max_position_embeddings": 2048, "model_type": "opt",
    "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 1, "vocab_size": 50272,
    "word_embed_proj_dim": 512})");
}

std::vector<std::string> keys(const std::vector<WeightSpec>& v) {
  std::vector<std::string> k;
  for (const WeightSpec& s : v) k.push_back(s.key);
  return k;
}
const WeightSpec& spec(const std::vector<WeightSpec>& v, const std::string& key) {
  for (const WeightSpec& s : v)
    if (s.key == key) return s;
  throw std::runtime_error("no spec " + key);
}

}  // namespace

TEST(ModelConfig, LlamaNano) {
  ModelConfig c = ModelConfig::from_dir(test::source_path("data/models/llama-nano"));
  EXPECT_TRUE(c.is_llama());
  EXPECT_EQ(c.vocab_size, 4096);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.intermediate_size, 768);
  EXPECT_EQ(c.num_layers, 4);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.kv_dim(), 128);
  EXPECT_EQ(c.max_position_embeddings, 1024);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_EQ(c.torch_dtype, "float16");
  EXPECT_EQ(c.position_offset, 0);
  EXPECT_TRUE(c.has_final_norm());
}

TEST(ModelConfig, OptNano) {
  ModelConfig c = ModelConfig::from_dir(test::source_path("data/models/opt-nano"));
  EXPECT_TRUE(c.is_opt());
  EXPECT_EQ(c.intermediate_size, 1024);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.word_embed_proj_dim, 256);
  EXPECT_FALSE(c.has_project_in_out());
  EXPECT_TRUE(c.has_final_norm());
  EXPECT_TRUE(c.do_layer_norm_before);
  EXPECT_TRUE(c.enable_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.position_offset, 2);
  EXPECT_EQ(c.pad_token_id, 1);
  EXPECT_EQ(c.bos_token_id, 2);
}

TEST(ModelConfig, SharedSmallModelsParse) {
  for (const char* m : {"llama-small", "opt-small"}) {
    std::string dir = test::shared_path(std::string("models/") + m);
    if (!std::ifstream(dir + "/config.json").good()) GTEST_SKIP() << dir << " absent";
    ModelConfig c = ModelConfig::from_dir(dir);
    EXPECT_EQ(c.hidden_size, 384) << m;
    EXPECT_EQ(c.num_layers, 8) << m;
    EXPECT_EQ(c.head_dim, 64) << m;
    EXPECT_EQ(c.num_kv_heads, c.is_llama() ? 2 : 6) << m;
  }
}

TEST(ModelConfig, LlamaDefaultsFollowTransformers) {
  json j = llama2_7b();
  j.erase("num_key_value_heads");  // original LLaMA-1 configs
  j.erase("rms_norm_eps");
  j.erase("tie_word_embeddings");
  ModelConfig c = parse(j);
  EXPECT_EQ(c.num_kv_heads, 32);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);  // LlamaConfig's default
  EXPECT_FALSE(c.tie_word_embeddings);
  // rope_theta at top level (transformers 4.x), then rope_parameters (5.x) overriding it.
  j["rope_theta"] = 500000.0;
  EXPECT_EQ(parse(j).rope_theta, 500000.0);
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  EXPECT_EQ(parse(j).rope_theta, 1e6);
  // Explicit head_dim (need not be hidden/heads), GQA, list of eos ids, null ids.
  j["head_dim"] = 96;
  j["num_key_value_heads"] = 8;
  j["eos_token_id"] = {128001, 128009};
  j["bos_token_id"] = nullptr;
  c = parse(j);
  EXPECT_EQ(c.head_dim, 96);
  EXPECT_EQ(c.q_dim(), 32 * 96);
  EXPECT_EQ(c.kv_dim(), 8 * 96);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128009}));
  EXPECT_EQ(c.bos_token_id, -1);
}

TEST(ModelConfig, OptDefaultsAndVariants) {
  ModelConfig c = parse(opt350m());
  EXPECT_TRUE(c.enable_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.layer_norm_elementwise_affine);
  EXPECT_FALSE(c.do_layer_norm_before);
  EXPECT_FALSE(c.has_final_norm());  // post-LN OPT has no final LayerNorm in transformers
  EXPECT_TRUE(c.has_project_in_out());
  json j = opt350m();
  j["do_layer_norm_before"] = true;
  EXPECT_TRUE(parse(j).has_final_norm());
  j["_remove_final_layer_norm"] = true;
  EXPECT_FALSE(parse(j).has_final_norm());
  j.erase("word_embed_proj_dim");
  EXPECT_EQ(parse(j).word_embed_proj_dim, 1024);
}

TEST(ModelConfig, RefusesUnsupportedOptions) {
  json j = nano("llama-nano");
  j["model_type"] = "mistral";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "model_type 'mistral'", "llama, opt"}));
  j.erase("model_type");
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "model_type", "llama"}));

  j = llama2_7b();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "rope_scaling", "'linear'", "not support"}));
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_NO_THROW(parse(j));
  j = nano("llama-nano");
  j["rope_parameters"]["rope_type"] = "llama3";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "rope_parameters", "'llama3'"}));

  j = nano("llama-nano");
  j["hidden_act"] = "gelu";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "hidden_act", "gelu", "silu"}));
  j = nano("opt-nano");
  j["activation_function"] = "gelu";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "activation_function", "gelu", "relu"}));
}

TEST(ModelConfig, MissingKeysWrongTypesImpossibleValues) {
  for (const char* m : {"llama-nano", "opt-nano"}) {
    for (const char* key : {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                            "max_position_embeddings"}) {
      json j = nano(m);
      j.erase(key);
      EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, std::string("'") + key + "'", "missing"})) << m;
    }
  }
  json j = nano("llama-nano");
  j.erase("intermediate_size");
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'intermediate_size'", "missing"}));
  j = nano("opt-nano");
  j.erase("ffn_dim");
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'ffn_dim'", "missing"}));

  j = nano("llama-nano");
  j["hidden_size"] = "256";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'hidden_size'", "integer", "string"}));
  j = nano("llama-nano");
  j["hidden_size"] = 256.5;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'hidden_size'", "integer"}));
  j = nano("llama-nano");
  j["tie_word_embeddings"] = "yes";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'tie_word_embeddings'", "true or false"}));
  j = nano("llama-nano");
  j["rms_norm_eps"] = "1e-5";
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'rms_norm_eps'", "number"}));
  j = nano("llama-nano");
  j["num_hidden_layers"] = 0;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'num_hidden_layers'", "> 0"}));

  j = nano("llama-nano");
  j["num_key_value_heads"] = 3;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'num_key_value_heads' = 3", "num_attention_heads = 4"}));
  j = nano("llama-nano");
  j.erase("head_dim");
  j["num_attention_heads"] = 6;
  j["num_key_value_heads"] = 6;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'num_attention_heads' = 6", "hidden_size = 256"}));
  j = nano("opt-nano");
  j["num_attention_heads"] = 3;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'num_attention_heads' = 3", "hidden_size = 256"}));
  j = nano("llama-nano");
  j["head_dim"] = 63;
  EXPECT_TRUE(throws_with([&] { parse(j); }, {kSrc, "'head_dim' = 63"}));

  EXPECT_TRUE(throws_with([&] { ModelConfig::parse("{\"model_type\": \"llama\",", kSrc); }, {kSrc, "not valid JSON"}));
  EXPECT_TRUE(throws_with([&] { ModelConfig::parse("[]", kSrc); }, {kSrc, "JSON object"}));
  std::string dir = test::make_temp_dir("cfg_missing");
  EXPECT_TRUE(throws_with([&] { ModelConfig::from_dir(dir); }, {dir + "/config.json", "cannot open"}));
  EXPECT_TRUE(throws_with([&] { ModelConfig::from_dir(dir + "/nope"); }, {dir + "/nope", "no such model directory"}));
}

TEST(WeightLayout, LlamaBlockAndEnds) {
  ModelConfig c = ModelConfig::from_dir(test::source_path("data/models/llama-nano"));
  auto b = block_weight_specs(c, 2);
  EXPECT_EQ(keys(b), (std::vector<std::string>{"input_layernorm.weight", "q_proj.weight", "k_proj.weight",
                                               "v_proj.weight", "o_proj.weight", "post_attention_layernorm.weight",
                                               "gate_proj.weight", "up_proj.weight", "down_proj.weight"}));
  EXPECT_EQ(spec(b, "q_proj.weight").hf_name, "model.layers.2.self_attn.q_proj.weight");
  EXPECT_EQ(spec(b, "q_proj.weight").shape, Shape({256, 256}));
  EXPECT_EQ(spec(b, "k_proj.weight").shape, Shape({128, 256}));
  EXPECT_EQ(spec(b, "k_proj.weight").why, "[num_key_value_heads*head_dim, hidden_size]");
  EXPECT_EQ(spec(b, "down_proj.weight").hf_name, "model.layers.2.mlp.down_proj.weight");
  EXPECT_EQ(spec(b, "down_proj.weight").shape, Shape({256, 768}));
  EXPECT_EQ(spec(b, "input_layernorm.weight").role, WeightRole::norm_weight);
  EXPECT_EQ(weight_role_dtype(WeightRole::norm_weight, DType::bf16), DType::f32);
  EXPECT_EQ(weight_role_dtype(WeightRole::linear_bias, DType::bf16), DType::bf16);
  EXPECT_THROW(block_weight_specs(c, 4), Error);

  EXPECT_EQ(keys(embedding_weight_specs(c)), (std::vector<std::string>{"embed_tokens.weight"}));
  auto h = head_weight_specs(c);
  EXPECT_EQ(keys(h), (std::vector<std::string>{"norm.weight", "lm_head.weight"}));
  EXPECT_EQ(spec(h, "norm.weight").hf_name, "model.norm.weight");
  EXPECT_EQ(spec(h, "lm_head.weight").hf_name, "model.embed_tokens.weight");  // tied

  json j = nano("llama-nano");
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  j["tie_word_embeddings"] = false;
  c = parse(j);
  b = block_weight_specs(c, 0);
  EXPECT_EQ(b.size(), 9u + 7u);
  EXPECT_EQ(spec(b, "k_proj.bias").shape, Shape({128}));
  EXPECT_EQ(spec(b, "o_proj.bias").shape, Shape({256}));
  EXPECT_EQ(spec(b, "up_proj.bias").shape, Shape({768}));
  EXPECT_EQ(spec(head_weight_specs(c), "lm_head.weight").hf_name, "lm_head.weight");
}

TEST(WeightLayout, OptBlockAndEnds) {
  ModelConfig c = ModelConfig::from_dir(test::source_path("data/models/opt-nano"));
  auto b = block_weight_specs(c, 3);
  EXPECT_EQ(keys(b), (std::vector<std::string>{"self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                                               "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                               "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias",
                                               "final_layer_norm.weight", "final_layer_norm.bias", "fc1.weight",
                                               "fc1.bias", "fc2.weight", "fc2.bias"}));
  EXPECT_EQ(spec(b, "out_proj.weight").hf_name, "model.decoder.layers.3.self_attn.out_proj.weight");
  EXPECT_EQ(spec(b, "fc1.weight").shape, Shape({1024, 256}));
  EXPECT_EQ(spec(b, "fc2.weight").shape, Shape({256, 1024}));
  EXPECT_EQ(spec(b, "final_layer_norm.bias").hf_name, "model.decoder.layers.3.final_layer_norm.bias");
  auto e = embedding_weight_specs(c);
  EXPECT_EQ(keys(e), (std::vector<std::string>{"embed_tokens.weight", "embed_positions.weight"}));
  EXPECT_EQ(spec(e, "embed_positions.weight").shape, Shape({1026, 256}));
  auto h = head_weight_specs(c);
  EXPECT_EQ(keys(h), (std::vector<std::string>{"final_layer_norm.weight", "final_layer_norm.bias", "lm_head.weight"}));
  EXPECT_EQ(spec(h, "lm_head.weight").hf_name, "model.decoder.embed_tokens.weight");

  // opt-350m: no biases when enable_bias is false, project_in/out, no final norm.
  json j = opt350m();
  j["enable_bias"] = false;
  j["layer_norm_elementwise_affine"] = false;
  c = parse(j);
  b = block_weight_specs(c, 0);
  EXPECT_EQ(b.size(), 10u);  // 2 norms x (weight, bias) synthesized + 6 Linear weights
  EXPECT_FALSE(spec(b, "self_attn_layer_norm.weight").stored);
  EXPECT_TRUE(spec(b, "fc1.weight").stored);
  e = embedding_weight_specs(c);
  EXPECT_EQ(spec(e, "embed_tokens.weight").shape, Shape({50272, 512}));
  EXPECT_EQ(spec(e, "embed_positions.weight").shape, Shape({2050, 1024}));
  EXPECT_EQ(spec(e, "project_in.weight").shape, Shape({1024, 512}));
  EXPECT_EQ(spec(e, "project_in.weight").hf_name, "model.decoder.project_in.weight");
  h = head_weight_specs(c);
  EXPECT_EQ(keys(h), (std::vector<std::string>{"project_out.weight", "lm_head.weight"}));
  EXPECT_EQ(spec(h, "project_out.weight").shape, Shape({512, 1024}));
  EXPECT_EQ(spec(h, "lm_head.weight").shape, Shape({50272, 512}));
}
