// The fused LWC step in the block trainer (quant/block_trainer.cpp, BlockQuantizer::enable_fused_lwc_update,
// ops/fake_quant_lwc_update.h): training with it must give the same bits as the unfused ops
// (OMNIQ_NO_FUSED_LWC=1): every epoch loss, the final γ/β and the final fused() weights, for a
// weight-only group-128 config (f16 weight copies, as the calibration keeps them; CUDA graphs on) and a
// per-channel W3 config (bf16 weights; eager steps; fused unless OMNIQ_FUSED_LWC_PER_CHANNEL=0), and
// W4A4 with LET (per-channel), where only down_proj is fused
// (losses of two consecutive blocks). Also: the ŵ caches are recomputed from restored γ, β (what the
// trainer does after a NaN retry's restore), and a persistent NaN is reported with finite parameters
// in the fused mode. Skipped without a GPU.
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "experiments/calib_bench.h"
#include "models/model_shapes.h"
#include "ops/adamw.h"
#include "ops/fake_quant.h"
#include "quant/block_quantizer.h"
#include "quant/block_trainer.h"
#include "runtime/error.h"
#include "tests/block_trainer_test_util.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

// Sets (or, with value null, clears) an environment switch while alive.
struct ScopedEnv {
  const char* key;
  ScopedEnv(const char* k, const char* v) : key(k) {
    if (v) setenv(k, v, 1);
    else unsetenv(k);
  }
  ~ScopedEnv() { unsetenv(key); }
};

// "tiny" widened so that group 128 divides every Linear's input (256, and 384 for down_proj), D = 64.
ModelConfig wide_tiny() {
  ModelConfig cfg = model_shape("tiny");
  cfg.hidden_size = 256;
  cfg.intermediate_size = 384;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 64;
  return cfg;
}

QuantConfig weight_only(int wbits, int group) {
  QuantConfig qc;
  qc.method = "omniquant";
  qc.wbits = wbits;
  qc.abits = 16;
  qc.group_size = group;
  qc.lwc = true;
  qc.let = false;
  qc.epochs = 3;
  return qc;
}

struct Outcome {
  BlockTrainingResult r;
  std::map<std::string, std::vector<float>> lwc;    // final γ/β by name
  std::map<std::string, std::vector<float>> fused;  // final fused() block
};

// One block trained on random data; f16_weights: the Linear weights as f16 copies; poison: epoch 1's
// first attempt reports a non-finite loss (a recoverable NaN: restore, halved rates, retry).
Outcome train(const ModelConfig& cfg, const QuantConfig& qc, bool fused, bool f16_weights, bool poison = false) {
  ScopedEnv sw("OMNIQ_NO_FUSED_LWC", fused ? nullptr : "1");
  BlockWeights w32, wc;
  random_block_weights(cfg, 0, 1, Device::cuda(), DType::bf16, w32, wc);
  if (f16_weights)
    for (const std::string& site : block_linear_sites(cfg)) {
      Tensor& w = wc.tensors.at(site + ".weight");
      w = w.to(DType::f16);
    }
  const int64_t N = 4, T = 32;
  Tensor q_inps = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 3, DType::bf16, Device::cuda());
  Tensor fp_outs = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 4, DType::bf16, Device::cuda());
  BlockQuantizer bq(cfg, qc, wc, nullptr, DType::bf16);
  Outcome o;
  BlockTrainingData data{&q_inps, &fp_outs, nullptr};
  if (poison) data.poison_loss = [](int epoch, int attempt) { return epoch == 1 && attempt == 0; };
  o.r = train_block(cfg, qc, block_params(wc), bq, data, 0);
  EXPECT_FALSE(bq.fused_lwc_enabled()) << "train_block must turn the fused mode off when it returns";
  for (const ag::Var& p : bq.lwc_params()) o.lwc[p->name] = p->value.to(Device::cpu()).to_f32_vector();
  BlockWeights f = bq.fused(wc, DType::bf16);
  for (const auto& [key, t] : f.tensors) o.fused[key] = t.to(Device::cpu()).to_f32_vector();
  return o;
}

void expect_same(const Outcome& fused, const Outcome& ref, int fused_weights) {
  EXPECT_EQ(fused.r.fused_lwc_weights, fused_weights);
  EXPECT_EQ(ref.r.fused_lwc_weights, 0);
  ASSERT_EQ(fused.r.epoch_loss.size(), ref.r.epoch_loss.size());
  for (size_t e = 0; e < ref.r.epoch_loss.size(); ++e) {
    EXPECT_TRUE(std::isfinite(ref.r.epoch_loss[e])) << e;
    EXPECT_EQ(fused.r.epoch_loss[e], ref.r.epoch_loss[e]) << "epoch " << e;
  }
  EXPECT_NE(ref.r.epoch_loss.front(), ref.r.epoch_loss.back()) << "the parameters did not move";
  ASSERT_EQ(fused.lwc.size(), ref.lwc.size());
  for (const auto& [name, v] : ref.lwc) EXPECT_TRUE(bit_equal(fused.lwc.at(name), v)) << name;
  ASSERT_EQ(fused.fused.size(), ref.fused.size());
  for (const auto& [key, v] : ref.fused) EXPECT_TRUE(bit_equal(fused.fused.at(key), v)) << key;
}

}  // namespace

TEST(BlockTrainerFusedLwcCuda, WeightOnlyGroup128EqualsUnfused) {
  OMNIQ_REQUIRE_CUDA();
  ScopedEnv graphs("OMNIQ_NO_CUDA_GRAPH", nullptr);
  const ModelConfig cfg = wide_tiny();
  const QuantConfig qc = weight_only(4, 128);
  const Outcome ref = train(cfg, qc, false, true), fused = train(cfg, qc, true, true);
  expect_same(fused, ref, 7);
  EXPECT_GT(fused.r.graph_steps, 0) << "the fused step should run under CUDA-graph replay here";
}

// A recoverable NaN in the fused mode under CUDA graphs: the restore refreshes the ŵ caches the
// captured step reads, so the retried epoch (halved rates) gives the unfused run's bits.
TEST(BlockTrainerFusedLwcCuda, RecoverableNanRetryEqualsUnfused) {
  OMNIQ_REQUIRE_CUDA();
  ScopedEnv graphs("OMNIQ_NO_CUDA_GRAPH", nullptr);
  const ModelConfig cfg = wide_tiny();
  const QuantConfig qc = weight_only(4, 128);
  const Outcome ref = train(cfg, qc, false, true, true), fused = train(cfg, qc, true, true, true);
  EXPECT_EQ(ref.r.nan_retries, 1);
  EXPECT_EQ(fused.r.nan_retries, 1);
  expect_same(fused, ref, 7);
  EXPECT_GT(fused.r.graph_steps, 0);
  const Outcome clean = train(cfg, qc, true, true, false);
  EXPECT_NE(clean.r.epoch_loss.back(), fused.r.epoch_loss.back()) << "the retry should run at halved rates";
}

// Per-channel weights are fused by default; OMNIQ_FUSED_LWC_PER_CHANNEL=0 keeps them unfused
// (block_trainer.cpp). Same bits either way.
TEST(BlockTrainerFusedLwcCuda, WeightOnlyPerChannelEqualsUnfusedEager) {
  OMNIQ_REQUIRE_CUDA();
  ScopedEnv eager("OMNIQ_NO_CUDA_GRAPH", "1");
  const ModelConfig cfg = model_shape("tiny");
  const QuantConfig qc = weight_only(3, 0);
  const Outcome ref = train(cfg, qc, false, false);
  {
    ScopedEnv per_channel("OMNIQ_FUSED_LWC_PER_CHANNEL", nullptr);
    expect_same(train(cfg, qc, true, false), ref, 7);  // the default: per-channel weights fused
  }
  ScopedEnv per_channel("OMNIQ_FUSED_LWC_PER_CHANNEL", "0");
  expect_same(train(cfg, qc, true, false), ref, 0);
}

// W4A4 with LET and the aug loss (LLaMA): q/k/v/o/gate/up keep the LET op, down_proj is fused.
TEST(BlockTrainerFusedLwcCuda, W4A4LetLossesEqualUnfused) {
  OMNIQ_REQUIRE_CUDA();
  ScopedEnv per_channel("OMNIQ_FUSED_LWC_PER_CHANNEL", "1");
  auto losses = [](bool fused) {
    ScopedEnv sw("OMNIQ_NO_FUSED_LWC", fused ? nullptr : "1");
    CalibBenchOptions o;
    o.shape = "tiny";
    o.blocks = 2;
    o.qc.method = "omniquant";
    o.qc.wbits = 4;
    o.qc.abits = 4;
    o.qc.group_size = 0;
    o.qc.lwc = o.qc.let = o.qc.aug_loss = true;
    o.qc.epochs = 2;
    o.qc.nsamples = 4;
    o.qc.seqlen = 64;
    o.device = Device::cuda();
    o.compute = DType::bf16;
    std::vector<double> l;
    for (const CalibBenchBlock& b : run_calib_bench(o).blocks) {
      l.insert(l.end(), b.report.epoch_loss.begin(), b.report.epoch_loss.end());
      l.push_back(b.report.final_loss);
    }
    return l;
  };
  const std::vector<double> ref = losses(false), fused = losses(true);
  ASSERT_EQ(ref.size(), fused.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_TRUE(std::isfinite(ref[i])) << i;
    EXPECT_EQ(fused[i], ref[i]) << "loss " << i;
  }
}

// The ŵ cache follows γ, β only through the fused step or refresh_fused_lwc_cache(): after γ, β are
// overwritten (as the trainer's restore() of a snapshot does) the forward must return the ŵ of the
// new values once refreshed, and not before.
TEST(BlockTrainerFusedLwcCuda, CacheRefreshFollowsRestoredParameters) {
  OMNIQ_REQUIRE_CUDA();
  const ModelConfig cfg = model_shape("tiny");
  const QuantConfig qc = weight_only(3, 32);
  BlockWeights w32, wc;
  random_block_weights(cfg, 0, 1, Device::cuda(), DType::bf16, w32, wc);
  BlockQuantizer bq(cfg, qc, wc, nullptr, DType::bf16);
  const std::vector<ag::Var> lwc = bq.lwc_params();
  std::vector<LwcAdamWSlot> slots;
  for (size_t i = 0; i < lwc.size(); ++i)
    slots.push_back({lwc[i], Tensor::zeros(lwc[i]->value.shape(), DType::f32, Device::cuda()),
                     Tensor::zeros(lwc[i]->value.shape(), DType::f32, Device::cuda()), static_cast<int64_t>(i)});
  std::vector<AdamWConfig> cfgs(lwc.size(), AdamWConfig{1e-3f});
  Tensor scalars = Tensor::from_f32(adamw_scalar_floats(cfgs, 1), {static_cast<int64_t>(lwc.size()) * 7},
                                    DType::f32, Device::cuda());
  ASSERT_EQ(bq.enable_fused_lwc_update(slots, scalars), 7);
  std::map<std::string, ag::Var> params = block_params(wc);
  const WeightQuantSpec spec{qc.wbits, qc.group_size, qc.symmetric};
  auto forward_of = [&](const std::string& site) {  // what the block computes with
    ag::Tape t;
    return bq.param(t, site + ".weight", params.at(site + ".weight"))->value.to(Device::cpu()).to_f32_vector();
  };
  auto expected = [&](const std::string& site) {
    const Tensor& g = bq.learned().at(site + ".lwc_gamma")->value;
    const Tensor& b = bq.learned().at(site + ".lwc_beta")->value;
    return fake_quant_weight_forward(wc.get(site + ".weight"), spec, &g, &b, DType::bf16)
        .to(Device::cpu())
        .to_f32_vector();
  };
  for (const std::string& site : block_linear_sites(cfg))
    EXPECT_TRUE(bit_equal(forward_of(site), expected(site))) << site;
  uint64_t seed = 7;
  for (const ag::Var& p : lwc) p->value.copy_from(Tensor::uniform(p->value.shape(), -1.0f, 3.0f, seed++));
  const std::string site = block_linear_sites(cfg)[0];
  EXPECT_FALSE(bit_equal(forward_of(site), expected(site))) << "the cache is stale until refreshed";
  bq.refresh_fused_lwc_cache();
  for (const std::string& s : block_linear_sites(cfg)) EXPECT_TRUE(bit_equal(forward_of(s), expected(s))) << s;
  // fused() never takes the cache: it quantizes from γ, β.
  BlockWeights f = bq.fused(wc, DType::bf16);
  ag::Tape t2;
  const ag::Var cached = bq.param(t2, site + ".weight", params.at(site + ".weight"));
  EXPECT_FALSE(f.get(site + ".weight").shares_storage_with(cached->value));
  EXPECT_TRUE(bit_equal(f.get(site + ".weight").to(Device::cpu()).to_f32_vector(), expected(site)));
  bq.disable_fused_lwc_update();
  EXPECT_FALSE(bq.fused_lwc_enabled());
}

// A persistent NaN loss in the fused mode: retried (restore + cache refresh), then reported; no
// non-finite parameter is kept.
TEST(BlockTrainerFusedLwcCuda, PersistentNanLossIsReportedAndParametersStayFinite) {
  OMNIQ_REQUIRE_CUDA();
  ScopedEnv sw("OMNIQ_NO_FUSED_LWC", nullptr);
  const ModelConfig cfg = model_shape("tiny");
  BlockWeights w32, wc;
  random_block_weights(cfg, 0, 1, Device::cuda(), DType::bf16, w32, wc);
  const int64_t N = 4, T = 32;
  Tensor q = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 3, DType::f32);
  q.data_as<float>()[2 * T * cfg.hidden_size + 5] = NAN;  // sample 2 is poisoned
  Tensor q_inps = q.to(DType::bf16).to(Device::cuda());
  Tensor fp_outs = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 4, DType::bf16, Device::cuda());
  QuantConfig qc = weight_only(3, 32);
  qc.epochs = 2;
  qc.max_nan_retries = 2;
  BlockQuantizer bq(cfg, qc, wc, nullptr, DType::bf16);
  ASSERT_NO_FATAL_FAILURE(
      bt_test::expect_nan_loss_reported(cfg, qc, wc, bq, q_inps, fp_outs, /*expect_retries=*/false));
  EXPECT_FALSE(bq.fused_lwc_enabled()) << "the fused mode must be off after train_block throws";
  bt_test::assert_lwc_params_finite(bq);
}
