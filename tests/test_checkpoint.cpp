// Model checkpoints: the bundled nano models load block by block with the right shapes, dtypes and
// values; sharded and base-model (no `model.` prefix) copies load identically; every bad input fails
// with a one-line message naming the file and the tensor.
#include <cstring>
#include <nlohmann/json.hpp>

#include "models/checkpoint.h"
#include "runtime/error.h"
#include "tests/models_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using nlohmann::json;
using omniq::test::RawEntry;
using omniq::test::throws_with;

namespace {

std::string nano_dir(const char* m) { return test::source_path(std::string("data/models/") + m); }
json nano_config(const char* m) { return json::parse(test::read_file_bytes(nano_dir(m) + "/config.json")); }
std::vector<RawEntry> nano_entries(const char* m) {
  return test::parse_safetensors_independently(nano_dir(m) + "/model.safetensors");
}

// A copy of a nano model in a temp dir, with edited entries / config.
std::string make_model(const std::string& tag, const json& config, const std::vector<RawEntry>& entries) {
  std::string dir = test::make_temp_dir(tag);
  test::write_file_bytes(dir + "/config.json", config.dump(2));
  test::write_safetensors(dir + "/model.safetensors", entries);
  return dir;
}

std::vector<RawEntry> without(std::vector<RawEntry> v, const std::string& name) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].name == name) v.erase(v.begin() + static_cast<long>(i));
  return v;
}

std::vector<float> first(const Tensor& t, size_t n) {
  std::vector<float> v = t.to_f32_vector();
  v.resize(n);
  return v;
}

void expect_same(const NamedWeights& a, const NamedWeights& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << a.what;
  for (const auto& kv : a.tensors) {
    const Tensor& t = b.get(kv.first);
    EXPECT_EQ(kv.second.shape(), t.shape()) << kv.first;
    EXPECT_EQ(kv.second.dtype(), t.dtype()) << kv.first;
    EXPECT_EQ(kv.second.to_f32_vector(), t.to_f32_vector()) << kv.first;
  }
}

}  // namespace

TEST(Checkpoint, LlamaNanoBlocksEmbeddingsHead) {
  ModelCheckpoint ck(nano_dir("llama-nano"));
  EXPECT_EQ(ck.num_blocks(), 4);
  EXPECT_FALSE(ck.reader().sharded());
  BlockWeights b = ck.load_block(3, DType::f32, Device::cpu());
  EXPECT_EQ(b.tensors.size(), 9u);
  EXPECT_EQ(b.get("q_proj.weight").shape(), Shape({256, 256}));
  EXPECT_EQ(b.get("k_proj.weight").shape(), Shape({128, 256}));
  EXPECT_EQ(b.get("down_proj.weight").shape(), Shape({256, 768}));
  EXPECT_EQ(b.get("input_layernorm.weight").dtype(), DType::f32);
  EXPECT_EQ(b.find("q_proj.bias"), nullptr);
  // Values read with Python's struct module from the committed file (fp16 -> fp32 is exact).
  EXPECT_EQ(first(b.get("down_proj.weight"), 3),
            (std::vector<float>{-0.02032470703125f, 0.01419830322265625f, -0.09454345703125f}));

  // bf16 compute: Linear weights in bf16, norms stay f32.
  BlockWeights h = ck.load_block(3, DType::bf16, Device::cpu());
  EXPECT_EQ(h.get("down_proj.weight").dtype(), DType::bf16);
  EXPECT_EQ(h.get("post_attention_layernorm.weight").dtype(), DType::f32);
  EXPECT_EQ(first(h.get("down_proj.weight"), 1)[0], round_bf16(-0.02032470703125f));
  // 7 bf16 Linear weights (q, o: 256x256; k, v: 128x256; gate, up, down: 768x256) + 2 f32 norms.
  EXPECT_EQ(h.nbytes(), (2u * 256 * 256 + 2u * 128 * 256 + 3u * 768 * 256) * 2 + 2u * 256 * 4);

  NamedWeights e = ck.load_embeddings(DType::f32, Device::cpu());
  EXPECT_EQ(e.get("embed_tokens.weight").shape(), Shape({4096, 256}));
  EXPECT_EQ(first(e.get("embed_tokens.weight"), 4),
            (std::vector<float>{-0.07086181640625f, 0.169189453125f, 0.028656005859375f, 0.164306640625f}));
  NamedWeights head = ck.load_head(DType::f32, Device::cpu(), &e);
  EXPECT_EQ(first(head.get("norm.weight"), 4),
            (std::vector<float>{1.76953125f, 1.7314453125f, 1.6865234375f, 1.580078125f}));
  EXPECT_TRUE(head.get("lm_head.weight").shares_storage_with(e.get("embed_tokens.weight")));  // tied
  NamedWeights head2 = ck.load_head(DType::f32, Device::cpu());  // no embeddings: read again
  EXPECT_FALSE(head2.get("lm_head.weight").shares_storage_with(e.get("embed_tokens.weight")));
  EXPECT_EQ(head2.get("lm_head.weight").to_f32_vector(), e.get("embed_tokens.weight").to_f32_vector());
  NamedWeights head3 = ck.load_head(DType::bf16, Device::cpu(), &e);  // dtype differs: no alias
  EXPECT_EQ(head3.get("lm_head.weight").dtype(), DType::bf16);

  EXPECT_TRUE(throws_with([&] { b.get("gate_proj.bias"); }, {"block 3 of", "'gate_proj.bias'", "up_proj.weight"}));
  EXPECT_TRUE(throws_with([&] { ck.load_block(4, DType::f32, Device::cpu()); }, {"block 4", "num_hidden_layers = 4"}));
  EXPECT_TRUE(throws_with([&] { ck.load_block(0, DType::i32, Device::cpu()); }, {"compute dtype", "i32"}));
}

TEST(Checkpoint, OptNanoBlocksEmbeddingsHead) {
  ModelCheckpoint ck(nano_dir("opt-nano"));
  NamedWeights e = ck.load_embeddings(DType::f32, Device::cpu());
  EXPECT_EQ(e.tensors.size(), 2u);
  EXPECT_EQ(e.get("embed_positions.weight").shape(), Shape({1026, 256}));
  EXPECT_EQ(first(e.get("embed_positions.weight"), 4),
            (std::vector<float>{-3.9458274841308594e-05f, -0.0078125f, 0.005290985107421875f, -0.021636962890625f}));
  BlockWeights b = ck.load_block(0, DType::bf16, Device::cpu());
  EXPECT_EQ(b.tensors.size(), 16u);
  EXPECT_EQ(b.get("fc1.bias").dtype(), DType::bf16);  // Linear biases in the compute dtype
  EXPECT_EQ(b.get("final_layer_norm.bias").dtype(), DType::f32);
  EXPECT_EQ(b.get("fc1.weight").shape(), Shape({1024, 256}));
  std::vector<float> fc1b = first(b.get("fc1.bias"), 4);
  std::vector<float> known = {-0.0268096923828125f, -0.03515625f, -0.028778076171875f, -0.0430908203125f};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(fc1b[i], round_bf16(known[i]));
  NamedWeights h = ck.load_head(DType::f32, Device::cpu(), &e);
  EXPECT_EQ(h.tensors.size(), 3u);
  EXPECT_EQ(first(h.get("final_layer_norm.bias"), 4),
            (std::vector<float>{-0.1314697265625f, 0.0928955078125f, 0.08819580078125f, -0.25732421875f}));
  EXPECT_TRUE(h.get("lm_head.weight").shares_storage_with(e.get("embed_tokens.weight")));
}

TEST(Checkpoint, EveryTensorMatchesIndependentParser) {
  for (const char* m : {"llama-nano", "opt-nano"}) {
    CheckpointReader r(nano_dir(m));
    auto ref = nano_entries(m);
    EXPECT_EQ(r.names().size(), ref.size());
    for (const RawEntry& x : ref) {
      ASSERT_EQ(x.dtype, "F16");
      Tensor h = r.load(x.name, DType::f16);
      ASSERT_EQ(h.nbytes(), x.bytes.size()) << x.name;
      EXPECT_EQ(std::memcmp(h.data(), x.bytes.data(), x.bytes.size()), 0) << x.name;
      std::vector<float> f = r.load(x.name, DType::f32).to_f32_vector();
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(x.bytes.data());
      for (size_t i = 0; i < f.size(); i += 97) ASSERT_EQ(f[i], f16_to_f32(bits[i])) << x.name << " at " << i;
      Tensor into = Tensor::zeros(h.shape(), DType::bf16);
      r.load_into(x.name, into);
      EXPECT_EQ(into.to_f32_vector()[0], round_bf16(f16_to_f32(bits[0]))) << x.name;
    }
    EXPECT_TRUE(throws_with([&] { r.load("model.nope", DType::f32); }, {nano_dir(m) + "/model.safetensors", "'model.nope'"}));
    Tensor wrong = Tensor::zeros({3}, DType::f32);
    EXPECT_TRUE(throws_with([&] { r.load_into(ref[0].name, wrong); }, {ref[0].name, "destination"}));
  }
}

TEST(Checkpoint, ShardedCopyLoadsIdentically) {
  auto entries = nano_entries("opt-nano");
  std::string dir = test::make_temp_dir("ck_sharded");
  test::copy_file(nano_dir("opt-nano") + "/config.json", dir + "/config.json");
  std::vector<RawEntry> s1, s2;
  json wm = json::object();
  for (size_t i = 0; i < entries.size(); ++i) {
    const char* shard = i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
    (i % 2 ? s2 : s1).push_back(entries[i]);
    wm[entries[i].name] = shard;
  }
  test::write_safetensors(dir + "/model-00001-of-00002.safetensors", s1);
  test::write_safetensors(dir + "/model-00002-of-00002.safetensors", s2);
  test::write_file_bytes(dir + "/model.safetensors.index.json",
                         json{{"metadata", {{"total_size", 8949072}}}, {"weight_map", wm}}.dump(2));
  CheckpointReader r(dir);
  EXPECT_TRUE(r.sharded());
  EXPECT_EQ(r.weights_path(), dir + "/model.safetensors.index.json");
  CheckpointReader single(nano_dir("opt-nano"));
  EXPECT_EQ(r.names(), single.names());
  for (const std::string& n : r.names()) {
    Tensor a = r.load(n, DType::f16), b = single.load(n, DType::f16);
    ASSERT_EQ(a.shape(), b.shape()) << n;
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << n;
  }
  EXPECT_EQ(r.file_of(entries[1].name), dir + "/model-00002-of-00002.safetensors");
  ModelCheckpoint ck(dir), ref(nano_dir("opt-nano"));
  for (int64_t i = 0; i < ck.num_blocks(); ++i)
    expect_same(ck.load_block(i, DType::f32, Device::cpu()), ref.load_block(i, DType::f32, Device::cpu()));
  expect_same(ck.load_embeddings(DType::bf16, Device::cpu()), ref.load_embeddings(DType::bf16, Device::cpu()));
  expect_same(ck.load_head(DType::f32, Device::cpu()), ref.load_head(DType::f32, Device::cpu()));

  // Shards open lazily: corrupt shard 2, and tensors of shard 1 still load; shard 2's name the file.
  std::string bytes = test::read_file_bytes(dir + "/model-00002-of-00002.safetensors");
  test::write_file_bytes(dir + "/model-00002-of-00002.safetensors", bytes.substr(0, bytes.size() / 2));
  CheckpointReader lazy(dir);
  EXPECT_NO_THROW(lazy.load(entries[0].name, DType::f32));
  EXPECT_TRUE(throws_with([&] { lazy.load(entries[1].name, DType::f32); },
                          {dir + "/model-00002-of-00002.safetensors", "truncated"}));

  // The index names a shard that does not exist.
  wm[entries[3].name] = "model-00003-of-00002.safetensors";
  test::write_file_bytes(dir + "/model.safetensors.index.json", json{{"weight_map", wm}}.dump());
  EXPECT_TRUE(throws_with([&] { CheckpointReader x(dir); },
                          {dir + "/model.safetensors.index.json", "'model-00003-of-00002.safetensors'", entries[3].name}));
  // The index puts a tensor in a shard that lacks it.
  wm[entries[3].name] = "model-00001-of-00002.safetensors";
  test::write_file_bytes(dir + "/model.safetensors.index.json", json{{"weight_map", wm}}.dump());
  CheckpointReader mis(dir);
  EXPECT_TRUE(throws_with([&] { mis.load(entries[3].name, DType::f32); },
                          {"model.safetensors.index.json", entries[3].name, "model-00001-of-00002.safetensors"}));
  // A malformed index.
  test::write_file_bytes(dir + "/model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_TRUE(throws_with([&] { CheckpointReader x(dir); }, {dir + "/model.safetensors.index.json", "not valid JSON"}));
  test::write_file_bytes(dir + "/model.safetensors.index.json", "{\"metadata\": {}}");
  EXPECT_TRUE(throws_with([&] { CheckpointReader x(dir); }, {dir + "/model.safetensors.index.json", "weight_map"}));
}

TEST(Checkpoint, BaseModelNamesWithoutModelPrefix) {
  for (const char* m : {"opt-nano", "llama-nano"}) {
    auto entries = nano_entries(m);
    for (RawEntry& x : entries) x.name = x.name.substr(6);  // "model.decoder.…" -> "decoder.…"
    ModelCheckpoint ck(make_model("ck_prefix", nano_config(m), entries)), ref(nano_dir(m));
    expect_same(ck.load_block(1, DType::f32, Device::cpu()), ref.load_block(1, DType::f32, Device::cpu()));
    expect_same(ck.load_embeddings(DType::f32, Device::cpu()), ref.load_embeddings(DType::f32, Device::cpu()));
    expect_same(ck.load_head(DType::f32, Device::cpu()), ref.load_head(DType::f32, Device::cpu()));
  }
}

TEST(Checkpoint, UntiedLmHead) {
  json cfg = nano_config("llama-nano");
  cfg["tie_word_embeddings"] = false;
  auto entries = nano_entries("llama-nano");
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(make_model("ck_untied", cfg, entries)); },
                          {"model.safetensors", "'lm_head.weight'", "tie_word_embeddings is false"}));
  RawEntry lm = entries[0];  // embed_tokens, negated so it differs
  ASSERT_EQ(lm.name, "model.embed_tokens.weight");
  lm.name = "lm_head.weight";
  for (size_t i = 1; i < lm.bytes.size(); i += 2) lm.bytes[i] = static_cast<char>(lm.bytes[i] ^ 0x80);
  entries.push_back(lm);
  ModelCheckpoint ck(make_model("ck_untied", cfg, entries));
  NamedWeights e = ck.load_embeddings(DType::f32, Device::cpu());
  NamedWeights h = ck.load_head(DType::f32, Device::cpu(), &e);
  EXPECT_FALSE(h.get("lm_head.weight").shares_storage_with(e.get("embed_tokens.weight")));
  EXPECT_EQ(first(h.get("lm_head.weight"), 2)[1], -0.169189453125f);
  // Tied config with a stored lm_head: the embedding wins, as in transformers.
  ModelCheckpoint tied(make_model("ck_tied_stored", nano_config("llama-nano"), entries));
  EXPECT_EQ(first(tied.load_head(DType::f32, Device::cpu()).get("lm_head.weight"), 2)[1], 0.169189453125f);
}

TEST(Checkpoint, OptWithoutBiasesOrAffineNorms) {
  json cfg = nano_config("opt-nano");
  cfg["enable_bias"] = false;
  cfg["layer_norm_elementwise_affine"] = false;
  std::vector<RawEntry> kept;
  for (const RawEntry& x : nano_entries("opt-nano"))
    if (x.name.find("layers.") == std::string::npos ||
        (x.name.find(".bias") == std::string::npos && x.name.find("layer_norm") == std::string::npos))
      kept.push_back(x);
  kept = without(without(kept, "model.decoder.final_layer_norm.weight"), "model.decoder.final_layer_norm.bias");
  ModelCheckpoint ck(make_model("ck_nobias", cfg, kept));
  BlockWeights b = ck.load_block(2, DType::bf16, Device::cpu());
  EXPECT_EQ(b.tensors.size(), 10u);
  EXPECT_FALSE(b.has("fc1.bias"));
  EXPECT_EQ(b.get("self_attn_layer_norm.weight").to_f32_vector(), std::vector<float>(256, 1.0f));
  EXPECT_EQ(b.get("final_layer_norm.bias").to_f32_vector(), std::vector<float>(256, 0.0f));
  EXPECT_EQ(b.get("final_layer_norm.bias").dtype(), DType::f32);
  NamedWeights h = ck.load_head(DType::f32, Device::cpu());
  EXPECT_EQ(h.tensors.size(), 3u);  // the final LayerNorm exists (pre-LN) but is the identity
  EXPECT_EQ(h.get("final_layer_norm.weight").to_f32_vector(), std::vector<float>(256, 1.0f));
}

TEST(Checkpoint, MissingConfigOrWeights) {
  std::string only_weights = test::make_temp_dir("ck_nocfg");
  test::copy_file(nano_dir("opt-nano") + "/model.safetensors", only_weights + "/model.safetensors");
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(only_weights); }, {only_weights + "/config.json"}));
  std::string only_config = test::make_temp_dir("ck_noweights");
  test::copy_file(nano_dir("opt-nano") + "/config.json", only_config + "/config.json");
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(only_config); }, {only_config, "no model.safetensors"}));
  test::write_file_bytes(only_config + "/pytorch_model.bin", "x");
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(only_config); }, {only_config, "pytorch_model.bin"}));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(only_config + "/nope"); }, {"nope", "no such model directory"}));
}

TEST(Checkpoint, CorruptWeightsNameFileAndTensor) {
  json cfg = nano_config("llama-nano");
  std::string dir = make_model("ck_trunc", cfg, nano_entries("llama-nano"));
  std::string bytes = test::read_file_bytes(dir + "/model.safetensors");
  test::write_file_bytes(dir + "/model.safetensors", bytes.substr(0, bytes.size() - 4096));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); }, {dir + "/model.safetensors", "tensor 'model.", "truncated"}));

  // Bad header JSON and an unknown dtype, as written into the real file.
  test::write_file_bytes(dir + "/model.safetensors", bytes.substr(0, 20) + std::string(bytes.size() - 20, '!'));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); }, {dir + "/model.safetensors", "not valid JSON"}));
  auto entries = nano_entries("llama-nano");
  entries[5].dtype = "Q4_K";
  std::string d2 = make_model("ck_dtype", cfg, entries);
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(d2); }, {d2 + "/model.safetensors", entries[5].name, "'Q4_K'"}));
  // A model weight stored as integers.
  entries = nano_entries("llama-nano");
  ASSERT_EQ(entries[1].name, "model.layers.0.input_layernorm.weight");
  entries[1].dtype = "I16";
  std::string d3 = make_model("ck_int", cfg, entries);
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(d3); }, {d3 + "/model.safetensors", entries[1].name, "I16"}));
}

TEST(Checkpoint, MissingTensorAndShapeMismatch) {
  json cfg = nano_config("llama-nano");
  std::string dir = make_model("ck_missing", cfg, without(nano_entries("llama-nano"), "model.layers.2.mlp.up_proj.weight"));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); },
                          {dir + "/model.safetensors", "'model.layers.2.mlp.up_proj.weight'", "missing",
                           dir + "/config.json", "[768, 256] = [intermediate_size, hidden_size]"}));
  cfg["intermediate_size"] = 512;
  dir = make_model("ck_shape", cfg, nano_entries("llama-nano"));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); },
                          {dir + "/model.safetensors", "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [768, 256]",
                           dir + "/config.json implies [512, 256]"}));
  json ocfg = nano_config("opt-nano");
  ocfg["max_position_embeddings"] = 2048;
  dir = make_model("ck_pos", ocfg, nano_entries("opt-nano"));
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); },
                          {"'model.decoder.embed_positions.weight' has shape [1026, 256]", "implies [2050, 256]"}));
}

TEST(Checkpoint, UnsupportedConfigInModelFolder) {
  json cfg = nano_config("llama-nano");
  cfg["model_type"] = "gpt2";
  std::string dir = make_model("ck_type", cfg, {});
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); }, {dir + "/config.json", "'gpt2'", "llama, opt"}));
  cfg = nano_config("llama-nano");
  cfg["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  dir = make_model("ck_rope", cfg, {});
  EXPECT_TRUE(throws_with([&] { ModelCheckpoint ck(dir); }, {dir + "/config.json", "rope_scaling", "'yarn'"}));
}

TEST(CheckpointCuda, BlocksOnGpuMatchCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const char* m : {"llama-nano", "opt-nano"}) {
    ModelCheckpoint ck(nano_dir(m));
    for (DType dt : {DType::f32, DType::bf16}) {
      // Conversions run on the GPU after upload; the values must be bit-identical to the host path.
      BlockWeights g = ck.load_block(1, dt, Device::cuda(0)), c = ck.load_block(1, dt, Device::cpu());
      for (const auto& kv : g.tensors) EXPECT_TRUE(kv.second.device().is_cuda()) << kv.first;
      expect_same(g, c);
      NamedWeights ge = ck.load_embeddings(dt, Device::cuda(0));
      expect_same(ge, ck.load_embeddings(dt, Device::cpu()));
      NamedWeights gh = ck.load_head(dt, Device::cuda(0), &ge);
      EXPECT_TRUE(gh.get("lm_head.weight").shares_storage_with(ge.get("embed_tokens.weight")));
      expect_same(gh, ck.load_head(dt, Device::cpu()));
    }
    // load_into a GPU tensor of another dtype.
    CheckpointReader r(nano_dir(m));
    std::string n = r.names()[0];
    Tensor dst = Tensor::zeros(r.info(n).shape(r.file_of(n)), DType::bf16, Device::cuda(0));
    r.load_into(n, dst);
    EXPECT_EQ(dst.to_f32_vector(), r.load(n, DType::bf16).to_f32_vector());
  }
}
