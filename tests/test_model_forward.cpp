// Model forward and perplexity vs transformers (fixtures from tests/reference/make_model_fixtures.py,
// run on the GPU machine): next-token logits (fp32 CPU, max relative error < 1e-4) and WikiText-2
// test perplexity (CPU fp32 and CUDA fp32 within 0.1%, CUDA bf16 within 0.5%).
// The nano models are bundled; the small ones are read from ../shared/models when present.
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/datasets.h"
#include "models/causal_lm.h"
#include "models/perplexity.h"
#include "models/tokenizer.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

struct Fixture {
  nlohmann::json meta;
  std::vector<float> logits;  // [positions, V]
};

bool file_exists(const std::string& p) { return std::ifstream(p).good(); }

std::string model_dir(const std::string& name) {
  // OMNIQ_ZOO_DIR: a folder holding the zoo models (e.g. copied next to the build on the GPU machine).
  if (const char* zoo = std::getenv("OMNIQ_ZOO_DIR")) {
    std::string p = std::string(zoo) + "/" + name;
    if (file_exists(p + "/config.json")) return p;
  }
  std::string bundled = test::source_path("data/models/" + name);
  if (file_exists(bundled + "/config.json")) return bundled;
  return test::shared_path("models/" + name);
}

bool load_fixture(const std::string& name, Fixture& fx) {
  std::string base = test::source_path("tests/fixtures/models/" + name);
  std::ifstream js(base + ".json");
  if (!js.good()) return false;
  fx.meta = nlohmann::json::parse(js);
  std::ifstream bin(base + ".logits.bin", std::ios::binary);
  if (!bin.good()) return false;
  size_t n = fx.meta["logit_positions"].size() * fx.meta["vocab_size"].get<size_t>();
  fx.logits.resize(n);
  bin.read(reinterpret_cast<char*>(fx.logits.data()), static_cast<std::streamsize>(n * sizeof(float)));
  return bin.gcount() == static_cast<std::streamsize>(n * sizeof(float));
}

#define REQUIRE_MODEL_AND_FIXTURE(name, fx)                                                      \
  Fixture fx;                                                                                    \
  if (!file_exists(model_dir(name) + "/config.json")) GTEST_SKIP() << "model " << name << " not found"; \
  if (!load_fixture(name, fx)) GTEST_SKIP() << "fixture for " << name << " missing (run tests/reference/make_model_fixtures.py)";

void check_logits(const std::string& name, Device dev, DType dt, float max_rel) {
  REQUIRE_MODEL_AND_FIXTURE(name, fx);
  CausalLM model(model_dir(name), dt, dev);
  std::vector<int32_t> ids = fx.meta["input_ids"].get<std::vector<int32_t>>();
  Tensor logits = model.forward(Tensor::from_i32(ids, {1, static_cast<int64_t>(ids.size())}));
  int64_t V = logits.size(-1);
  ASSERT_EQ(V, fx.meta["vocab_size"].get<int64_t>());
  std::vector<float> all = logits.to_f32_vector(), got;
  for (int p : fx.meta["logit_positions"].get<std::vector<int>>())
    got.insert(got.end(), all.begin() + p * V, all.begin() + (p + 1) * V);
  float rel = test::max_rel_error(got, fx.logits);
  std::printf("%s logits on %s/%s: max relative error %.3g\n", name.c_str(), dev.str().c_str(), dtype_name(dt), rel);
  EXPECT_LT(rel, max_rel);
}

void check_ppl(const std::string& name, Device dev, DType dt, const char* ref_key, double tol) {
  REQUIRE_MODEL_AND_FIXTURE(name, fx);
  if (!fx.meta["ppl"].contains(ref_key)) GTEST_SKIP() << "fixture has no " << ref_key;
  Tokenizer tok = Tokenizer::from_model_dir(model_dir(name));
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  ASSERT_EQ(static_cast<int64_t>(ids.size()), fx.meta["num_tokens"].get<int64_t>());
  CausalLM model(model_dir(name), dt, dev);
  PerplexityResult r = evaluate_perplexity(model, ids, fx.meta["seqlen"].get<int64_t>());
  double ref = fx.meta["ppl"][ref_key].get<double>();
  std::printf("%s ppl on %s/%s: %.5f (transformers %s: %.5f, rel diff %.3g%%, %.0f tokens/s)\n", name.c_str(),
              dev.str().c_str(), dtype_name(dt), r.ppl, ref_key, ref, 100 * std::fabs(r.ppl - ref) / ref,
              r.tokens_per_second);
  EXPECT_NEAR(r.ppl, ref, tol * ref);
}

}  // namespace

// One test per model and check, so a missing (skipped) model never hides another's result.
#define MODEL_TESTS(Id, name)                                                                          \
  TEST(ModelForward, Id##LogitsMatchTransformersCpuF32) { check_logits(name, Device::cpu(), DType::f32, 1e-4f); } \
  TEST(ModelForwardCuda, Id##LogitsMatchTransformersF32) {                                             \
    OMNIQ_REQUIRE_CUDA();                                                                              \
    check_logits(name, Device::cuda(), DType::f32, 1e-4f);                                             \
  }                                                                                                    \
  TEST(ModelPerplexityCuda, Id##MatchesTransformersF32) {                                              \
    OMNIQ_REQUIRE_CUDA();                                                                              \
    check_ppl(name, Device::cuda(), DType::f32, "cuda_f32", 1e-3);                                     \
  }                                                                                                    \
  TEST(ModelPerplexityCuda, Id##MatchesTransformersBf16) {                                             \
    OMNIQ_REQUIRE_CUDA();                                                                              \
    check_ppl(name, Device::cuda(), DType::bf16, "cuda_bf16", 5e-3);                                   \
  }

MODEL_TESTS(LlamaNano, "llama-nano")
MODEL_TESTS(OptNano, "opt-nano")
MODEL_TESTS(LlamaSmall, "llama-small")
MODEL_TESTS(OptSmall, "opt-small")

// Whole-file CPU perplexity: minutes per model on a 2-core machine, so the nano models run in CI
// and the small ones when OMNIQ_SLOW_TESTS=1 (run on the GPU machine's CPUs for the closing note).
TEST(ModelPerplexity, LlamaNanoMatchesTransformersCpuF32) { check_ppl("llama-nano", Device::cpu(), DType::f32, "cpu_f32", 1e-3); }
TEST(ModelPerplexity, OptNanoMatchesTransformersCpuF32) { check_ppl("opt-nano", Device::cpu(), DType::f32, "cpu_f32", 1e-3); }
TEST(ModelPerplexity, SmallModelsMatchTransformersCpuF32) {
  if (!std::getenv("OMNIQ_SLOW_TESTS")) GTEST_SKIP() << "set OMNIQ_SLOW_TESTS=1 to run (several minutes on 2 cores)";
  check_ppl("llama-small", Device::cpu(), DType::f32, "cpu_f32", 1e-3);
  check_ppl("opt-small", Device::cpu(), DType::f32, "cpu_f32", 1e-3);
}
