// Hugging Face folder export: the bundled nano models re-exported bit-identically, overrides change
// exactly their tensor, sharding as save_pretrained names it, base-model/untied sources, and the
// folder-level crash safety (never a half-written folder under the output name).
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "models/checkpoint.h"
#include "models/hf_export.h"
#include "models/safetensors_writer.h"
#include "runtime/error.h"
#include "tests/models_test_util.h"
#include "tests/file_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::throws_with;

namespace {

using file_test::list_dir;  // tests/file_test_util.h

std::string model_dir(const std::string& name) { return test::source_path("data/models/" + name); }

bool exists(const std::string& p) {
  struct stat st;
  return ::lstat(p.c_str(), &st) == 0;
}

std::string raw_bytes(const CheckpointReader& r, const std::string& name) {
  RawTensorBytes b = r.raw(name);
  return std::string(static_cast<const char*>(b.data), b.bytes);
}

std::string tensor_bytes(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  return std::string(static_cast<const char*>(h.data()), h.nbytes());
}

const auto kNoOverride = [](const std::string&) -> const Tensor* { return nullptr; };

// Every exported tensor is byte-identical to the source's except those in `changed`
// (name -> expected bytes).
void expect_tensors(const std::string& src, const std::string& out, const std::map<std::string, std::string>& changed = {}) {
  ModelCheckpoint s(src), o(out);  // the export must pass the same validation as a downloaded model
  std::vector<std::string> names = hf_tensor_names(s);
  EXPECT_EQ(o.reader().names(), [&] { auto v = names; std::sort(v.begin(), v.end()); return v; }())
      << "the export holds exactly the layout's tensors";
  for (const std::string& n : names) {
    const SafetensorsTensorInfo& i = o.reader().info(n);
    EXPECT_EQ(i.dtype_str, "F16") << n;
    auto it = changed.find(n);
    if (it != changed.end()) {
      EXPECT_EQ(raw_bytes(o.reader(), n), it->second) << n << " should carry the override";
      EXPECT_NE(raw_bytes(o.reader(), n), raw_bytes(s.reader(), n)) << n;
    } else {
      EXPECT_EQ(raw_bytes(o.reader(), n), raw_bytes(s.reader(), n)) << n << " changed";
    }
  }
}

// The plain export of a bundled model: files, config, tokenizer, tensors; and the independent parser.
void check_plain_export(const std::string& name) {
  std::string root = test::make_temp_dir("hf_" + name);
  std::string out = root + "/exported";
  export_hf_model(model_dir(name), out, kNoOverride);
  EXPECT_EQ(list_dir(root), std::vector<std::string>{"exported"}) << "no .partial / temp left";
  std::vector<std::string> want = {"config.json", "generation_config.json", "model.safetensors", kHfExportMarker,
                                   "tokenizer.json", "tokenizer_config.json"};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(list_dir(out), want);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    EXPECT_EQ(test::read_file_bytes(out + "/" + f), test::read_file_bytes(model_dir(name) + "/" + f)) << f;
  // config.json: same keys in the same order; the source is f16 already, so identical values.
  auto src_cfg = nlohmann::ordered_json::parse(test::read_file_bytes(model_dir(name) + "/config.json"));
  auto out_cfg = nlohmann::ordered_json::parse(test::read_file_bytes(out + "/config.json"));
  EXPECT_EQ(out_cfg.dump(), src_cfg.dump());
  expect_tensors(model_dir(name), out);
  // Second implementation: the independent parser sees the same bytes as the source file.
  auto a = test::by_name(test::parse_safetensors_independently(out + "/model.safetensors"));
  auto b = test::by_name(test::parse_safetensors_independently(model_dir(name) + "/model.safetensors"));
  ASSERT_EQ(a.size(), b.size());
  for (const auto& kv : b) {
    ASSERT_TRUE(a.count(kv.first)) << kv.first;
    EXPECT_EQ(a.at(kv.first).bytes, kv.second.bytes) << kv.first;
    EXPECT_EQ(a.at(kv.first).dims, kv.second.dims) << kv.first;
  }
  EXPECT_EQ(SafetensorsFile(out + "/model.safetensors").metadata().at("format"), "pt");
}

// A temp copy of llama-nano with its config edited and tensors renamed/added (sources other than
// save_pretrained's: base-model names, an untied head, unused buffers).
std::string make_variant(const std::string& root, const std::function<void(nlohmann::ordered_json&)>& edit_cfg,
                         const std::function<std::string(const std::string&)>& rename,
                         const std::vector<std::pair<std::string, const Tensor*>>& extra) {
  std::string dir = root + "/variant";
  ::mkdir(dir.c_str(), 0755);
  auto cfg = nlohmann::ordered_json::parse(test::read_file_bytes(model_dir("llama-nano") + "/config.json"));
  edit_cfg(cfg);
  test::write_file_bytes(dir + "/config.json", cfg.dump(2));
  test::copy_file(model_dir("llama-nano") + "/tokenizer.json", dir + "/tokenizer.json");
  SafetensorsFile f(model_dir("llama-nano") + "/model.safetensors");
  std::vector<Tensor> keep;
  keep.reserve(f.size());
  std::vector<std::pair<std::string, const Tensor*>> list;
  for (const std::string& n : f.names()) keep.push_back(f.read(n));
  for (size_t i = 0; i < f.names().size(); ++i) list.push_back({rename(f.names()[i]), &keep[i]});
  list.insert(list.end(), extra.begin(), extra.end());
  write_safetensors(dir + "/model.safetensors", list, {{"format", "pt"}});
  return dir;
}

}  // namespace

TEST(HfExport, LlamaNanoRoundTripBitIdentical) { check_plain_export("llama-nano"); }
TEST(HfExport, OptNanoRoundTripBitIdentical) { check_plain_export("opt-nano"); }

TEST(HfExport, TensorNamesFollowTheLayout) {
  ModelCheckpoint l(model_dir("llama-nano"));
  std::vector<std::string> n = hf_tensor_names(l);
  ASSERT_EQ(n.size(), 38u);  // 4 x 9 + embed_tokens + norm; tied lm_head not written
  EXPECT_EQ(n.front(), "model.embed_tokens.weight");
  EXPECT_EQ(n[1], "model.layers.0.input_layernorm.weight");
  EXPECT_EQ(n.back(), "model.norm.weight");
  ModelCheckpoint o(model_dir("opt-nano"));
  n = hf_tensor_names(o);
  ASSERT_EQ(n.size(), 68u);
  EXPECT_EQ(n[1], "model.decoder.embed_positions.weight");
  EXPECT_EQ(n.back(), "model.decoder.final_layer_norm.bias");
}

TEST(HfExport, OverrideOneBlockWeightChangesOnlyThatTensor) {
  std::string root = test::make_temp_dir("hf_override");
  const std::string target = "model.layers.1.self_attn.q_proj.weight";
  Tensor q = Tensor::uniform(Shape{256, 256}, -0.5f, 0.5f, 42, DType::f32);  // f32: converted to f16 on export
  std::vector<std::string> asked;
  export_hf_model(model_dir("llama-nano"), root + "/out", [&](const std::string& n) -> const Tensor* {
    asked.push_back(n);
    return n == target ? &q : nullptr;
  });
  EXPECT_EQ(asked, hf_tensor_names(ModelCheckpoint(model_dir("llama-nano")))) << "once per tensor, in layout order";
  expect_tensors(model_dir("llama-nano"), root + "/out", {{target, tensor_bytes(q.to(DType::f16))}});
}

TEST(HfExport, BadOverridesAreErrorsAndLeaveNothing) {
  std::string root = test::make_temp_dir("hf_badover");
  std::string out = root + "/out";
  const std::string target = "model.layers.2.mlp.up_proj.weight";  // [768, 256]
  auto with = [&](const Tensor& t) {
    return [&, target](const std::string& n) -> const Tensor* { return n == target ? &t : nullptr; };
  };
  Tensor wrong_shape = Tensor::zeros(Shape{256, 768}, DType::f16);
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), out, with(wrong_shape)); },
                          {target, "[256, 768]", "[768, 256]"}));
  Tensor ints = Tensor::zeros(Shape{768, 256}, DType::i32);
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), out, with(ints)); }, {target, "i32"}));
  Tensor huge = Tensor::full(Shape{768, 256}, 1e6f, DType::f32);  // inf in f16
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), out, with(huge)); },
                          {target, "non-finite", "65504"}));
  Tensor nan = Tensor::full(Shape{768, 256}, NAN, DType::bf16);
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), out, with(nan)); }, {target, "non-finite"}));
  EXPECT_TRUE(list_dir(root).empty()) << "a failed export leaves neither the folder nor .partial";
  // bf16 export keeps 1e6 finite.
  HfExportOptions bf;
  bf.dtype = DType::bf16;
  export_hf_model(model_dir("llama-nano"), out, with(huge), bf);
  EXPECT_EQ(ModelCheckpoint(out).reader().load(target, DType::f32).to_f32_vector()[0], round_bf16(1e6f));
}

TEST(HfShardPlan, MatchesHuggingFaceHubSplit) {
  size_t n = 0;
  // 10 > 6 gets its own shard, listed before the shard being filled (huggingface_hub's order).
  EXPECT_EQ(hf_shard_plan({3, 3, 10, 3, 3, 3}, 6, &n), (std::vector<size_t>{1, 1, 0, 2, 2, 3}));
  EXPECT_EQ(n, 4u);
  EXPECT_EQ(hf_shard_plan({3, 3, 10}, 0, &n), (std::vector<size_t>{0, 0, 0}));
  EXPECT_EQ(n, 1u);
  EXPECT_EQ(hf_shard_plan({2, 2, 2}, 100, &n), (std::vector<size_t>{0, 0, 0}));
  EXPECT_EQ(n, 1u);
  EXPECT_EQ(hf_shard_plan({}, 100, &n).size(), 0u);
  EXPECT_EQ(hf_shard_file_name(0, 1), "model.safetensors");
  EXPECT_EQ(hf_shard_file_name(1, 12), "model-00002-of-00012.safetensors");
}

TEST(HfExport, ShardedExportLoadsIdentically) {
  std::string root = test::make_temp_dir("hf_shard");
  std::string out = root + "/out";
  HfExportOptions opt;
  opt.max_shard_bytes = 600000;  // embed_tokens (2 MiB) alone; ~2 blocks per shard
  export_hf_model(model_dir("opt-nano"), out, kNoOverride, opt);
  EXPECT_FALSE(exists(out + "/model.safetensors"));
  auto index = nlohmann::ordered_json::parse(test::read_file_bytes(out + "/model.safetensors.index.json"));
  std::vector<std::string> keys;
  for (auto it = index.begin(); it != index.end(); ++it) keys.push_back(it.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"metadata", "weight_map"}));

  ModelCheckpoint src(model_dir("opt-nano"));
  std::vector<std::string> names = hf_tensor_names(src);
  std::vector<size_t> bytes;
  size_t total = 0;
  int64_t params = 0;
  for (const std::string& n : names) {
    bytes.push_back(src.reader().info(n).nbytes);
    total += bytes.back();
    params += src.reader().info(n).numel;
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<size_t>(), total);
  EXPECT_EQ(index["metadata"]["total_parameters"].get<int64_t>(), params);
  size_t num = 0;
  std::vector<size_t> plan = hf_shard_plan(bytes, opt.max_shard_bytes, &num);
  ASSERT_GT(num, 3u);
  const auto& wm = index["weight_map"];
  ASSERT_EQ(wm.size(), names.size());
  std::map<std::string, std::vector<std::string>> per_file;
  std::string prev;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    EXPECT_LT(prev, it.key()) << "weight_map keys sorted";
    prev = it.key();
    per_file[it.value().get<std::string>()].push_back(it.key());
  }
  for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(wm[names[i]], hf_shard_file_name(plan[i], num)) << names[i];
  EXPECT_EQ(wm["model.decoder.embed_tokens.weight"], strformat("model-00001-of-%05zu.safetensors", num));
  std::vector<std::string> files = list_dir(out);
  EXPECT_EQ(per_file.size(), num);
  for (auto& kv : per_file) {
    SafetensorsFile f(out + "/" + kv.first);  // each shard holds exactly what the index says
    std::sort(kv.second.begin(), kv.second.end());
    EXPECT_EQ(f.names(), kv.second) << kv.first;
    EXPECT_EQ(f.metadata().at("format"), "pt");
  }
  EXPECT_EQ(files.size(), num + 6) << "shards, index, config, marker, tokenizer(_config).json, generation_config.json";

  ModelCheckpoint o(out);
  EXPECT_TRUE(o.reader().sharded());
  expect_tensors(model_dir("opt-nano"), out);
  for (int64_t b = 0; b < o.num_blocks(); ++b) {
    BlockWeights x = o.load_block(b, DType::f32, Device::cpu()), y = src.load_block(b, DType::f32, Device::cpu());
    for (const auto& kv : y.tensors) EXPECT_EQ(tensor_bytes(x.get(kv.first)), tensor_bytes(kv.second)) << kv.first;
  }
}

TEST(HfExport, ExistingFolders) {
  std::string root = test::make_temp_dir("hf_exist");
  std::string out = root + "/out";
  // A folder that is not ours is never overwritten.
  ::mkdir(out.c_str(), 0755);
  test::write_file_bytes(out + "/notes.txt", "mine");
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), out, kNoOverride); },
                          {out, "not a previous omniq export", "refusing"}));
  EXPECT_EQ(list_dir(out), std::vector<std::string>{"notes.txt"});
  EXPECT_EQ(list_dir(root), std::vector<std::string>{"out"});
  std::string file = root + "/file";
  test::write_file_bytes(file, "x");
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), file, kNoOverride); }, {file, "not a directory"}));
  EXPECT_TRUE(throws_with([&] { export_hf_model(model_dir("llama-nano"), model_dir("llama-nano") + "/", kNoOverride); },
                          {"is the source model folder"}));

  // An empty folder is filled; a previous export is replaced (and a stale .partial of a crashed
  // export is discarded, never mistaken for a result).
  std::string out2 = root + "/out2";
  ::mkdir(out2.c_str(), 0755);
  export_hf_model(model_dir("llama-nano"), out2, kNoOverride);
  expect_tensors(model_dir("llama-nano"), out2);
  ::mkdir((out2 + ".partial").c_str(), 0755);
  test::write_file_bytes(out2 + ".partial/model.safetensors", "garbage");
  const std::string target = "model.layers.0.mlp.down_proj.weight";
  Tensor d = Tensor::uniform(Shape{256, 768}, -1, 1, 3, DType::f16);
  export_hf_model(model_dir("llama-nano"), out2, [&](const std::string& n) { return n == target ? &d : nullptr; });
  expect_tensors(model_dir("llama-nano"), out2, {{target, tensor_bytes(d)}});
  EXPECT_EQ(list_dir(root), (std::vector<std::string>{"file", "out", "out2"})) << "no .partial / .old left";
}

// write(2) failing part-way (file size limit; a full disk takes the same path): no folder appears,
// no .partial stays, and a previous export survives intact.
TEST(HfExport, WriteFailureLeavesPreviousExportIntact) {
  std::string root = test::make_temp_dir("hf_fail");
  std::string out = root + "/out";
  struct rlimit old;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 1 << 20;  // llama-nano's weights are 8 MiB
  auto run_limited = [&](const std::string& dst) {
    ::setrlimit(RLIMIT_FSIZE, &lim);
    auto r = throws_with([&] { export_hf_model(model_dir("llama-nano"), dst, kNoOverride); }, {"File too large"});
    ::setrlimit(RLIMIT_FSIZE, &old);
    return r;
  };
  EXPECT_TRUE(run_limited(out));
  EXPECT_TRUE(list_dir(root).empty());

  export_hf_model(model_dir("llama-nano"), out, kNoOverride);
  const std::string marker = test::read_file_bytes(out + "/" + kHfExportMarker);
  EXPECT_TRUE(run_limited(out));
  ::signal(SIGXFSZ, old_handler);
  EXPECT_EQ(list_dir(root), std::vector<std::string>{"out"});
  EXPECT_EQ(test::read_file_bytes(out + "/" + kHfExportMarker), marker);
  expect_tensors(model_dir("llama-nano"), out);
}

TEST(HfExport, Bf16AndF32Exports) {
  std::string root = test::make_temp_dir("hf_dtypes");
  ModelCheckpoint src(model_dir("opt-nano"));
  for (DType dt : {DType::bf16, DType::f32}) {
    std::string out = root + "/" + dtype_name(dt);
    HfExportOptions opt;
    opt.dtype = dt;
    export_hf_model(model_dir("opt-nano"), out, kNoOverride, opt);
    auto cfg = nlohmann::ordered_json::parse(test::read_file_bytes(out + "/config.json"));
    EXPECT_EQ(cfg["dtype"], dt == DType::bf16 ? "bfloat16" : "float32");
    EXPECT_FALSE(cfg.contains("torch_dtype")) << "only the key the source uses is updated";
    ModelCheckpoint o(out);
    for (const std::string& n : hf_tensor_names(src)) {
      EXPECT_EQ(o.reader().info(n).dtype, dt) << n;  // norms too: HF loads every tensor in the model dtype
      EXPECT_EQ(raw_bytes(o.reader(), n), tensor_bytes(src.reader().load(n, dt))) << n;
    }
  }
}

TEST(HfExport, BaseModelNamesUntiedHeadAndUnusedTensors) {
  std::string root = test::make_temp_dir("hf_variant");
  Tensor head = Tensor::uniform(Shape{4096, 256}, -0.1f, 0.1f, 8, DType::f16);
  Tensor inv_freq = Tensor::uniform(Shape{32}, 0, 1, 9, DType::f32);
  std::string src = make_variant(
      root,
      [](nlohmann::ordered_json& c) {
        c["tie_word_embeddings"] = false;
        c.erase("dtype");
        c["torch_dtype"] = "float16";
      },
      [](const std::string& n) { return n.substr(6); },  // "model.layers.0..." -> "layers.0..." (LlamaModel)
      {{"lm_head.weight", &head}, {"layers.0.self_attn.rotary_emb.inv_freq", &inv_freq}});
  ModelCheckpoint s(src);
  std::vector<std::string> names = hf_tensor_names(s);
  ASSERT_EQ(names.size(), 39u);
  EXPECT_EQ(names.front(), "model.embed_tokens.weight");
  EXPECT_EQ(names.back(), "lm_head.weight");
  HfExportOptions opt;
  opt.dtype = DType::bf16;
  export_hf_model(src, root + "/out", kNoOverride, opt, {{"omniq_quant.json", "{\"wbits\": 3}\n"}});
  ModelCheckpoint o(root + "/out");
  std::vector<std::string> sorted = names;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(o.reader().names(), sorted) << "canonical names, untied head kept, unused buffer dropped";
  EXPECT_EQ(tensor_bytes(o.reader().load("lm_head.weight", DType::f32)), tensor_bytes(head.to(DType::bf16).to(DType::f32)));
  EXPECT_EQ(tensor_bytes(o.reader().load("model.layers.3.mlp.up_proj.weight", DType::f32)),
            tensor_bytes(s.reader().load("layers.3.mlp.up_proj.weight", DType::bf16).to(DType::f32)));
  auto cfg = nlohmann::ordered_json::parse(test::read_file_bytes(root + "/out/config.json"));
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
  EXPECT_FALSE(cfg.contains("dtype"));
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  EXPECT_EQ(test::read_file_bytes(root + "/out/omniq_quant.json"), "{\"wbits\": 3}\n");
  auto marker = nlohmann::json::parse(test::read_file_bytes(root + "/out/" + kHfExportMarker));
  EXPECT_EQ(marker["format"], "omniq-hf-export");
  EXPECT_EQ(marker["num_tensors"], 39);

  for (const char* bad : {"config.json", "model-00001-of-00002.safetensors", "../x", kHfExportMarker})
    EXPECT_TRUE(throws_with([&] { export_hf_model(src, root + "/bad", kNoOverride, {}, {{bad, "x"}}); }, {bad}));
  EXPECT_FALSE(exists(root + "/bad"));
}

// Not a check by itself: with OMNIQ_EXPORT_DIR set, leaves exports for
// tests/reference/check_hf_export.py (transformers, on the GPU machine) to load and evaluate, e.g.
//   OMNIQ_EXPORT_DIR=/tmp/exp ./build/tests/test_hf_export --gtest_filter='*ForTransformers*'
//   python3 tests/reference/check_hf_export.py /tmp/exp/llama-nano-sharded --ref-ppl <fixture cuda_f32 ppl>
TEST(HfExport, WriteExportsForTransformersCheck) {
  const char* dir = std::getenv("OMNIQ_EXPORT_DIR");
  if (!dir || !*dir) GTEST_SKIP() << "set OMNIQ_EXPORT_DIR to write exports for check_hf_export.py";
  ::mkdir(dir, 0755);
  HfExportOptions sharded;
  sharded.max_shard_bytes = 1 << 20;
  for (const char* m : {"llama-nano", "opt-nano"}) {
    export_hf_model(model_dir(m), std::string(dir) + "/" + m, kNoOverride);
    export_hf_model(model_dir(m), std::string(dir) + "/" + m + "-sharded", kNoOverride, sharded);
    std::printf("wrote %s/%s and %s/%s-sharded\n", dir, m, dir, m);
  }
}

TEST(HfExportCuda, CudaOverrideMatchesHostOverride) {
  OMNIQ_REQUIRE_CUDA();
  std::string root = test::make_temp_dir("hf_cuda");
  const std::string target = "model.decoder.layers.3.fc1.weight";  // [1024, 256]
  Tensor host = Tensor::uniform(Shape{1024, 256}, -0.3f, 0.3f, 5, DType::f32);
  Tensor dev_bf16 = host.to(DType::bf16).to(Device::cuda(0));
  Tensor dev_f16 = host.to(Device::cuda(0)).to(DType::f16);
  export_hf_model(model_dir("opt-nano"), root + "/a", [&](const std::string& n) { return n == target ? &dev_bf16 : nullptr; });
  expect_tensors(model_dir("opt-nano"), root + "/a", {{target, tensor_bytes(host.to(DType::bf16).to(DType::f16))}});
  export_hf_model(model_dir("opt-nano"), root + "/b", [&](const std::string& n) { return n == target ? &dev_f16 : nullptr; });
  expect_tensors(model_dir("opt-nano"), root + "/b", {{target, tensor_bytes(dev_f16)}});
}
