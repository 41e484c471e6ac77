// OmniQuant building blocks on real (nano) blocks: LET is an exact equivalence (fused == original,
// trained == fused), LET gradients through a whole block match finite differences, NaN losses are
// handled, and the CPU pipeline improves on RTN.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/functions.h"
#include "models/causal_lm.h"
#include "models/checkpoint.h"
#include "models/datasets.h"
#include "models/perplexity.h"
#include "models/tokenizer.h"
#include "quant/block_quantizer.h"
#include "quant/block_trainer.h"
#include "quant/calibrate.h"
#include "runtime/error.h"
#include "tests/block_trainer_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

std::string nano(const char* arch) { return test::source_path(std::string("data/models/") + arch + "-nano"); }

// Hidden states entering block 0 for the first T tokens of WikiText.
Tensor block_input(const ModelCheckpoint& ck, int64_t T) {
  Tokenizer tok = Tokenizer::from_model_dir(ck.dir());
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  ids.resize(static_cast<size_t>(T));
  NamedWeights emb = ck.load_embeddings(DType::f32, Device::cpu());
  return embed_tokens(ck.config(), emb, Tensor::from_i32(ids, {1, T}), Device::cpu());
}

// Sets every LET parameter to random values around its init (so the transform is far from identity).
void randomize_let(BlockQuantizer& bq, uint64_t seed) {
  for (auto& [name, v] : bq.learned()) {
    if (name.find(".let_") == std::string::npos) continue;
    bool shift = name.find("shift") != std::string::npos;
    Tensor r = Tensor::uniform(v->value.shape(), shift ? -0.5f : 0.5f, shift ? 0.5f : 2.0f, seed++);
    v->value.copy_from(r);
  }
}

QuantConfig let_only_config(bool act_quant) {
  QuantConfig qc;
  qc.method = "omniquant";
  qc.wbits = 16;
  qc.abits = act_quant ? 8 : 16;  // OPT shifts exist only in weight-activation settings
  qc.lwc = false;
  qc.let = true;
  return qc;
}

void check_let_equivalence(const char* arch) {
  ModelCheckpoint ck(nano(arch));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  Tensor x = block_input(ck, 48);
  Tensor ref = decoder_block_forward(cfg, w, x);

  ActivationStatsRecorder stats;
  {
    ag::Tape t;
    decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &stats);
  }
  QuantConfig qc = let_only_config(/*act_quant=*/true);
  BlockQuantizer bq(cfg, qc, w, &stats.stats(), DType::f32);
  randomize_let(bq, 7);
  if (cfg.is_opt()) {
    EXPECT_TRUE(bq.learned().count("qkv.let_shift") && bq.learned().count("out.let_shift")) << "OPT W-A uses shifts";
  }
  // The block as trained (transform applied through the hooks, no activation quantizers) ...
  struct NoActQuant : BlockHooks {
    BlockQuantizer* bq;
    ag::Var param(ag::Tape& t, const std::string& k, const ag::Var& p) override { return bq->param(t, k, p); }
  } hooks;
  hooks.bq = &bq;
  ag::Tape t;
  Tensor trained = decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &hooks)->value.clone();
  // ... and as fused: the plain architecture with rewritten weights.
  BlockWeights fused = bq.fused(w, DType::f32);
  EXPECT_EQ(fused.tensors.size(), w.tensors.size()) << "fusion must keep the architecture";
  Tensor fused_out = decoder_block_forward(cfg, fused, x);
  float e1 = test::max_rel_error(fused_out.to_f32_vector(), ref.to_f32_vector());
  float e2 = test::max_rel_error(trained.to_f32_vector(), fused_out.to_f32_vector());
  std::printf("%s LET: fused vs original rel err %.2e, trained vs fused %.2e\n", arch, e1, e2);
  EXPECT_LT(e1, 1e-5f);
  EXPECT_LT(e2, 1e-6f);
  // The transform must actually have changed the weights.
  EXPECT_GT(test::max_abs_diff(fused.get("q_proj.weight").to_f32_vector(), w.get("q_proj.weight").to_f32_vector()), 1e-3f);
}

}  // namespace

TEST(Let, FusedLlamaBlockEqualsOriginal) { check_let_equivalence("llama"); }
TEST(Let, FusedOptBlockEqualsOriginal) { check_let_equivalence("opt"); }

TEST(Let, GradientsThroughWholeBlockMatchFiniteDifferences) {
  for (const char* arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    BlockWeights w = ck.load_block(0, DType::f32, Device::cpu());
    Tensor x = block_input(ck, 12);
    ActivationStatsRecorder stats;
    {
      ag::Tape t;
      decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &stats);
    }
    BlockQuantizer bq(cfg, let_only_config(true), w, &stats.stats(), DType::f32);
    randomize_let(bq, 3);
    // The complete transform is an exact equivalence (the loss would not depend on s at all), so
    // leave one side of every pair untouched (norms, k_proj, o_proj/out_proj): then every
    // scale/shift reaches the loss through the same chain (gathers, floors, row/column scaling,
    // W·δ bias terms) that training differentiates. No activation quantizers (not smooth).
    struct TransformOnly : BlockHooks {
      BlockQuantizer* bq;
      ag::Var param(ag::Tape& t, const std::string& k, const ag::Var& p) override {
        bool keep = k.find("norm") != std::string::npos || k.rfind("k_proj", 0) == 0 || k.rfind("o_proj", 0) == 0 ||
                    k.rfind("out_proj", 0) == 0;
        return keep ? p : bq->param(t, k, p);
      }
    } hooks;
    hooks.bq = &bq;
    Tensor target = Tensor::uniform(x.shape(), -1, 1, 5);
    auto loss_of = [&](ag::Tape& t) {
      ag::Var y = decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &hooks);
      return ag::mse_loss(t, y, ag::constant(target.alias()));
    };
    ag::Tape t;
    ag::Var loss = loss_of(t);
    t.backward(loss);
    auto f = [&]() {
      ag::Tape t2;
      return static_cast<double>(loss_of(t2)->value.item());
    };
    for (auto& [name, v] : bq.learned()) {
      ASSERT_TRUE(v->grad.defined()) << arch << " " << name;
      EXPECT_TRUE(test::check_gradient(v->value, f, v->grad, 1e-2, 2e-5, 3e-2, 24)) << arch << " " << name;
    }
  }
}

TEST(BlockTrainer, PersistentNanLossIsReportedAndParametersStayFinite) {
  ModelCheckpoint ck(nano("llama"));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(0, DType::f32, Device::cpu());
  Tensor x = block_input(ck, 16);
  Tensor q_inps = Tensor::empty({3, 16, cfg.hidden_size}, DType::f32);
  for (int j = 0; j < 3; ++j) q_inps.view_rows(j, 1).copy_from(x);
  Tensor fp_outs = q_inps.clone();
  q_inps.data_as<float>()[2 * 16 * cfg.hidden_size + 5] = NAN;  // sample 2 is poisoned
  QuantConfig qc;
  qc.wbits = 3;
  qc.epochs = 2;
  qc.max_nan_retries = 2;
  BlockQuantizer bq(cfg, qc, w, nullptr, DType::f32);
  ASSERT_NO_FATAL_FAILURE(
      bt_test::expect_nan_loss_reported(cfg, qc, w, bq, q_inps, fp_outs, /*expect_retries=*/true));
  bt_test::assert_lwc_params_finite(bq);
}

// A recoverable non-finite loss (injected at epoch 1's first attempt): the epoch is restored, the
// learning rates halve, the retry succeeds; the run ends with every epoch's loss, one retry and a
// warning, and differs from an undisturbed run only from epoch 1 on (the halved rates).
TEST(BlockTrainer, RecoverableNanLossRestoresAndRetries) {
  ModelCheckpoint ck(nano("llama"));
  const ModelConfig& cfg = ck.config();
  Tensor x = block_input(ck, 16);
  Tensor q_inps = Tensor::empty({3, 16, cfg.hidden_size}, DType::f32);
  for (int j = 0; j < 3; ++j) q_inps.view_rows(j, 1).copy_from(x);
  Tensor fp_outs = q_inps.clone();
  fp_outs.data_as<float>()[7] += 0.5f;  // a target the block does not already meet
  QuantConfig qc;
  qc.wbits = 3;
  qc.epochs = 3;
  qc.max_nan_retries = 1;
  auto run = [&](bool poison, std::vector<std::vector<float>>* lwc) {
    BlockWeights w = ck.load_block(0, DType::f32, Device::cpu());
    BlockQuantizer bq(cfg, qc, w, nullptr, DType::f32);
    BlockTrainingData data{&q_inps, &fp_outs, nullptr};
    int calls = 0;
    if (poison)
      data.poison_loss = [&](int epoch, int attempt) {
        ++calls;
        return epoch == 1 && attempt == 0;
      };
    BlockTrainingResult r = train_block(cfg, qc, block_params(w), bq, data, 0);
    if (poison) EXPECT_EQ(calls, 4) << "one query per attempt: epochs 0, 1 (twice), 2";
    for (ag::Var& p : bq.lwc_params()) lwc->push_back(p->value.to_f32_vector());
    return r;
  };
  std::vector<std::vector<float>> clean_lwc, retried_lwc;
  const BlockTrainingResult clean = run(false, &clean_lwc), retried = run(true, &retried_lwc);
  EXPECT_EQ(clean.nan_retries, 0);
  EXPECT_EQ(retried.nan_retries, 1);
  ASSERT_EQ(retried.warnings.size(), 1u);
  EXPECT_NE(retried.warnings[0].find("retrying"), std::string::npos) << retried.warnings[0];
  ASSERT_EQ(retried.epoch_loss.size(), 3u);
  ASSERT_EQ(clean.epoch_loss.size(), 3u);
  EXPECT_EQ(retried.epoch_loss[0], clean.epoch_loss[0]) << "epoch 0 ran before the injection";
  EXPECT_NE(retried.epoch_loss[2], clean.epoch_loss[2]) << "the retry should run at halved rates";
  for (double l : retried.epoch_loss) EXPECT_TRUE(std::isfinite(l));
  ASSERT_EQ(retried_lwc.size(), clean_lwc.size());
  for (const auto& v : retried_lwc)
    for (float f : v) ASSERT_TRUE(std::isfinite(f));
}

// The CI-sized OmniQuant run (issue 4): 16 samples x 256 tokens, 2 epochs, on the CPU.
TEST(OmniQuantCpu, NanoLlamaLossDecreasesAndBeatsRtn) {
  std::string tmp = testing::TempDir() + "/omniq_quant_test";
  std::filesystem::remove_all(tmp);
  auto run = [&](const std::string& method, const std::string& out) {
    CalibrationOptions o;
    o.model_dir = nano("llama");
    o.out_dir = tmp + "/" + out;
    o.qc.method = method;
    o.qc.wbits = 3;
    o.qc.group_size = 0;
    o.qc.lwc = method == "omniquant";
    o.qc.epochs = method == "omniquant" ? 2 : 0;
    o.qc.nsamples = 16;
    o.qc.seqlen = 256;
    return calibrate_model(o);
  };
  CalibrationResult rtn = run("rtn", "rtn");
  CalibrationResult omni = run("omniquant", "omni");
  for (const BlockReport& b : omni.blocks) {
    ASSERT_EQ(b.epoch_loss.size(), 2u);
    EXPECT_LT(b.epoch_loss.back(), b.epoch_loss.front()) << "block " << b.block;
    EXPECT_LE(b.final_loss, rtn.blocks[static_cast<size_t>(b.block)].final_loss * 1.0001) << "block " << b.block;
  }
  Tokenizer tok = Tokenizer::from_model_dir(nano("llama"));
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  ids.resize(32 * 256);
  double p_rtn = evaluate_perplexity(CausalLM(tmp + "/rtn", DType::f32, Device::cpu()), ids, 256).ppl;
  double p_omni = evaluate_perplexity(CausalLM(tmp + "/omni", DType::f32, Device::cpu()), ids, 256).ppl;
  std::printf("llama-nano W3A16 (32 windows x 256): RTN ppl %.3f, OmniQuant ppl %.3f\n", p_rtn, p_omni);
  EXPECT_LE(p_omni, p_rtn);
}

TEST(OmniQuantCpu, ResumeFromStateGivesIdenticalExport) {
  std::string tmp = testing::TempDir() + "/omniq_resume_test";
  std::filesystem::remove_all(tmp);
  CalibrationOptions o;
  o.model_dir = nano("opt");
  o.out_dir = tmp + "/a";
  o.qc.wbits = 4;
  o.qc.abits = 8;
  o.qc.lwc = true;
  o.qc.let = true;
  o.qc.epochs = 1;
  o.qc.nsamples = 4;
  o.qc.seqlen = 64;
  calibrate_model(o);
  // Simulate a run killed after block 1: drop the later blocks' results and the export, rerun.
  std::filesystem::rename(tmp + "/a", tmp + "/a_full");
  std::filesystem::remove(tmp + "/a.state/block_002.safetensors");
  std::filesystem::remove(tmp + "/a.state/block_003.safetensors");
  CalibrationResult r = calibrate_model(o);
  EXPECT_TRUE(r.blocks[0].resumed && r.blocks[1].resumed);
  EXPECT_FALSE(r.blocks[2].resumed || r.blocks[3].resumed);
  ModelCheckpoint a(tmp + "/a"), b(tmp + "/a_full");
  for (const std::string& name : a.reader().names()) {
    std::vector<float> x = a.reader().load(name, DType::f32).to_f32_vector();
    std::vector<float> y = b.reader().load(name, DType::f32).to_f32_vector();
    ASSERT_EQ(x, y) << name << " differs after resume";
  }
  // A different configuration must not silently reuse the state.
  o.qc.wbits = 3;
  EXPECT_THROW(calibrate_model(o), Error);
}

// RTN of every zoo model and paper setting vs a straightforward PyTorch RTN (fixtures from
// tests/reference/make_rtn_fixtures.py), evaluated in fp32 on the GPU: within 0.2%.
TEST(RtnCuda, PerplexityMatchesPyTorchRtn) {
  OMNIQ_REQUIRE_CUDA();
  const char* zoo = std::getenv("OMNIQ_ZOO_DIR");
  for (const char* name : {"llama-nano", "opt-nano", "llama-small", "opt-small"}) {
    std::ifstream fx(test::source_path(std::string("tests/fixtures/rtn/") + name + ".json"));
    std::string dir = test::source_path(std::string("data/models/") + name);
    if (!std::filesystem::exists(dir + "/config.json") && zoo) dir = std::string(zoo) + "/" + name;
    if (!fx.good() || !std::filesystem::exists(dir + "/config.json")) {
      std::printf("%s: model or RTN fixture not present, skipped\n", name);
      continue;
    }
    nlohmann::json ref = nlohmann::json::parse(fx);
    Tokenizer tok = Tokenizer::from_model_dir(dir);
    std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
    for (auto& [label, value] : ref["ppl"].items()) {
      CalibrationOptions o;
      o.model_dir = dir;
      o.out_dir = testing::TempDir() + "/omniq_rtn_" + name + "_" + label;
      std::filesystem::remove_all(o.out_dir);
      std::filesystem::remove_all(o.out_dir + ".state");
      o.qc.method = "rtn";
      o.qc.lwc = false;
      o.qc.epochs = 0;
      o.qc.wbits = label[1] - '0';
      size_t g = label.find('g');
      o.qc.group_size = g == std::string::npos ? 0 : std::stoi(label.substr(g + 1));
      o.qc.nsamples = 2;
      o.qc.seqlen = 128;
      o.device = Device::cuda();
      o.compute = DType::f32;
      calibrate_model(o);
      double ppl = evaluate_perplexity(CausalLM(o.out_dir, DType::f32, Device::cuda()), ids, ref["seqlen"].get<int64_t>()).ppl;
      double want = value.get<double>();
      std::printf("%s %s: omniq RTN ppl %.4f, PyTorch RTN %.4f (rel diff %.3f%%)\n", name, label.c_str(), ppl, want,
                  100 * std::fabs(ppl - want) / want);
      EXPECT_NEAR(ppl, want, 2e-3 * want) << name << " " << label;
    }
  }
}
