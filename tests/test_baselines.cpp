// SmoothQuant and AWQ on real nano blocks (CPU): the fused transforms are exact equivalences before
// quantization, SmoothQuant's scales are the paper's formula, AWQ's α is the argmin of the loss it
// measures (and re-measuring agrees), and both beat plain RTN on block output MSE.
#include <cmath>
#include <cstdio>

#include "models/causal_lm.h"
#include "models/checkpoint.h"
#include "models/datasets.h"
#include "models/tokenizer.h"
#include "ops/reduce.h"
#include "quant/awq.h"
#include "quant/block_quantizer.h"
#include "quant/smoothquant.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

std::string nano(const std::string& arch) { return test::source_path("data/models/" + arch + "-nano"); }

// N calibration windows of T tokens of WikiText through one block: inputs, fp outputs, statistics.
struct BlockData {
  BlockWeights w;
  Tensor inps, fp_outs;
  ActivationStatsRecorder rec;  // ChannelStats hold move-only tensors: keep the recorder
  const std::map<std::string, ChannelStats>& stats() const { return rec.stats(); }
};

// Windows start at token `first` (held-out data: a later offset).
BlockData block_data(const ModelCheckpoint& ck, int64_t block, int64_t N, int64_t T, int64_t first = 0) {
  const ModelConfig& cfg = ck.config();
  BlockData d;
  d.w = ck.load_block(block, DType::f32, Device::cpu());
  Tokenizer tok = Tokenizer::from_model_dir(ck.dir());
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  NamedWeights emb = ck.load_embeddings(DType::f32, Device::cpu());
  d.inps = Tensor::empty({N, T, cfg.hidden_size}, DType::f32);
  d.fp_outs = Tensor::empty({N, T, cfg.hidden_size}, DType::f32);
  for (int64_t j = 0; j < N; ++j) {
    std::vector<int32_t> win(ids.begin() + first + j * T, ids.begin() + first + (j + 1) * T);
    // Blocks > 0 get their inputs by running the earlier fp blocks.
    Tensor x = embed_tokens(cfg, emb, Tensor::from_i32(win, {1, T}), Device::cpu());
    for (int64_t b = 0; b < block; ++b) x = decoder_block_forward(cfg, ck.load_block(b, DType::f32, Device::cpu()), x);
    d.inps.view_rows(j, 1).copy_from(x);
    ag::Tape t;
    ag::Var y = decoder_block_forward(t, cfg, block_params(d.w), ag::constant(x.alias()), &d.rec);
    d.fp_outs.view_rows(j, 1).copy_from(y->value);
  }
  return d;
}

QuantConfig config(const std::string& method, int wbits, int abits) {
  QuantConfig qc;
  qc.method = method;
  qc.wbits = wbits;
  qc.abits = abits;
  qc.lwc = false;
  qc.let = false;
  return qc;
}

double rtn_mse(const ModelConfig& cfg, const BlockData& d, int wbits, int abits, int group = 0) {
  QuantConfig qc = config("rtn", wbits, abits);
  qc.group_size = group;
  BlockQuantizer bq(cfg, qc, d.w, nullptr, DType::f32);
  return block_output_mse(cfg, bq.fused(d.w, DType::f32), d.inps, d.fp_outs, abits);
}

// Fused (no quantization) vs original block on the first sample: max elementwise relative error.
float equivalence_error(const ModelConfig& cfg, const BlockData& d, BlockQuantizer& bq16) {
  Tensor x = d.inps.view_rows(0, 1);
  Tensor ref = decoder_block_forward(cfg, d.w, x);
  BlockWeights fused = bq16.fused(d.w, DType::f32);
  EXPECT_EQ(fused.tensors.size(), d.w.tensors.size());
  Tensor out = decoder_block_forward(cfg, fused, x);
  return test::max_rel_error(out.to_f32_vector(), ref.to_f32_vector());
}

std::vector<std::string> scale_pairs() { return {"qkv", "out", "fc1"}; }

}  // namespace

// (a) + (b): SmoothQuant's scales are max|X|^α / max|W|^(1−α) and fusing them changes nothing.
TEST(SmoothQuant, ScalesMatchFormulaAndFusedBlockEqualsOriginal) {
  for (std::string arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    BlockData d = block_data(ck, 1, 2, 48);
    QuantConfig qc = config("smoothquant", 16, 16);
    BlockQuantizer bq(cfg, qc, d.w, &d.stats(), DType::f32);
    EXPECT_EQ(bq.learned().count("qkt.let_scale"), 0u) << "SmoothQuant does not scale q/k";
    EXPECT_TRUE(bq.lwc_params().empty());
    init_smoothquant(bq, cfg, qc, d.w, d.stats());
    for (const TransformPair& p : block_transform_pairs(cfg)) {
      if (p.name == "qkt") continue;
      // Independent recomputation: host loops over the raw weight and statistic vectors.
      std::vector<float> act = d.stats().at(p.consumers[0]).absmax.to_f32_vector();
      std::vector<double> xmax(static_cast<size_t>(p.channels), 0.0), wmax(static_cast<size_t>(p.channels), 0.0);
      int64_t group = static_cast<int64_t>(act.size()) / p.channels;  // o_proj columns per v row... by head
      for (const std::string& c : p.consumers) {
        const Tensor& wt = d.w.get(c + ".weight");
        std::vector<float> wv = wt.to_f32_vector();
        int64_t out = wt.size(0), in = wt.size(1);
        for (int64_t col = 0; col < in; ++col) {
          // GQA (out pair): o_proj column h·D+dd belongs to v row (h / (H/Hkv))·D + dd.
          int64_t ch = group == 1 ? col : (col / cfg.head_dim / group) * cfg.head_dim + col % cfg.head_dim;
          for (int64_t r = 0; r < out; ++r) wmax[ch] = std::max(wmax[ch], std::fabs(static_cast<double>(wv[r * in + col])));
          xmax[ch] = std::max(xmax[ch], static_cast<double>(act[col]));
        }
      }
      std::vector<float> got = bq.learned().at(p.name + ".let_scale")->value.to_f32_vector();
      ASSERT_EQ(got.size(), xmax.size());
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        double want = std::max(std::sqrt(std::max(xmax[i], 1e-5)) / std::sqrt(std::max(wmax[i], 1e-5)), 1e-5);
        worst = std::max(worst, std::fabs(got[i] - want) / want);
      }
      EXPECT_LT(worst, 1e-5) << arch << " " << p.name;
    }
    float e = equivalence_error(cfg, d, bq);
    std::printf("%s SmoothQuant fused vs original: max rel err %.2e\n", arch.c_str(), e);
    EXPECT_LT(e, 1e-5f);
    BlockWeights fused = bq.fused(d.w, DType::f32);
    EXPECT_GT(test::max_abs_diff(fused.get("q_proj.weight").to_f32_vector(), d.w.get("q_proj.weight").to_f32_vector()),
              1e-3f)
        << "the transform must change the weights";
  }
}

// (a) for AWQ: the scales it chooses (W3 search), fused without quantization, change nothing.
// (c): the chosen α is the argmin of the recorded losses, and re-measuring confirms it.
TEST(Awq, ChosenAlphaMinimisesMeasuredLossAndFusedBlockEqualsOriginal) {
  for (std::string arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    BlockData d = block_data(ck, 1, 2, 48);
    QuantConfig qc = config("awq", 3, 16);
    BlockQuantizer bq(cfg, qc, d.w, &d.stats(), DType::f32);
    AwqReport rep = init_awq(bq, cfg, qc, d.w, block_params(d.w), d.inps, d.fp_outs, d.stats());

    std::map<std::string, std::vector<float>> chosen;
    for (const std::string& p : scale_pairs()) chosen[p] = bq.learned().at(p + ".let_scale")->value.to_f32_vector();
    for (const std::string& p : scale_pairs()) {
      const std::vector<double>& l = rep.loss_per_alpha.at(p);
      ASSERT_EQ(l.size(), 20u);
      size_t arg = static_cast<size_t>(std::min_element(l.begin(), l.end()) - l.begin());
      std::printf("%s AWQ %s: alpha %.2f, loss(alpha=0) %.4e, loss(chosen) %.4e\n", arch.c_str(), p.c_str(),
                  rep.alpha.at(p), l[0], l[arg]);
      EXPECT_NEAR(rep.alpha.at(p), arg / 20.0, 1e-12) << p;
      EXPECT_LE(l[arg], l[0]) << p;
    }

    // Re-measure independently: scales from the formula computed here, earlier pairs at their
    // chosen scales, later at 1, no clipping (σ(γ) = 1), as during the search.
    for (auto& v : bq.lwc_params()) v->value.copy_from(Tensor::full(v->value.shape(), 30.0f, DType::f32));
    auto set = [&](const std::string& p, const std::vector<float>& s) {
      bq.learned().at(p + ".let_scale")->value.copy_from(Tensor::from_f32(s, {static_cast<int64_t>(s.size())}));
    };
    std::vector<TransformPair> pairs = block_transform_pairs(cfg);
    for (size_t i = 0; i < 3; ++i) {
      const TransformPair& p = pairs[i];
      ASSERT_EQ(p.name, scale_pairs()[i]) << "pairs come in forward order";
      for (size_t j = 0; j < 3; ++j) {
        if (j < i) set(scale_pairs()[j], chosen[scale_pairs()[j]]);
        if (j > i) set(scale_pairs()[j], std::vector<float>(chosen[scale_pairs()[j]].size(), 1.0f));
      }
      // mean|X| per pair channel, the out pair averaged over the query heads sharing a kv head.
      std::vector<float> m = pair_channel_stat(cfg, p, d.stats().at(p.consumers[0]).absmean.to_f32_vector(), true);
      auto loss_at = [&](double alpha) {
        std::vector<float> s(m.size());
        double lo = INFINITY, hi = 0;
        for (size_t c = 0; c < m.size(); ++c) {
          s[c] = static_cast<float>(std::pow(std::max<double>(m[c], 1e-4), alpha));
          lo = std::min<double>(lo, s[c]);
          hi = std::max<double>(hi, s[c]);
        }
        for (float& v : s) v = static_cast<float>(v / std::sqrt(lo * hi));
        set(p.name, s);
        return block_output_mse(cfg, bq.fused(d.w, DType::f32), d.inps, d.fp_outs, 16);
      };
      double a = rep.alpha.at(p.name);
      double l_chosen = loss_at(a);
      EXPECT_NEAR(l_chosen, rep.loss_per_alpha.at(p.name)[static_cast<size_t>(std::lround(a * 20))], 1e-6 * l_chosen);
      for (double other : {a == 0.0 ? 0.5 : 0.0, a == 0.95 ? 0.25 : 0.95}) {
        double l_other = loss_at(other);
        EXPECT_LE(l_chosen, l_other * (1 + 1e-6)) << arch << " " << p.name << " alpha " << other;
      }
    }

    // Equivalence: the chosen scales fused into an unquantized block.
    QuantConfig qc16 = config("awq", 16, 16);
    BlockQuantizer bq16(cfg, qc16, d.w, &d.stats(), DType::f32);
    for (const std::string& p : scale_pairs()) bq16.learned().at(p + ".let_scale")->value.copy_from(Tensor::from_f32(chosen[p], {static_cast<int64_t>(chosen[p].size())}));
    float e = equivalence_error(cfg, d, bq16);
    std::printf("%s AWQ fused vs original: max rel err %.2e\n", arch.c_str(), e);
    EXPECT_LT(e, 1e-5f);
  }
}

// (d) AWQ vs RTN, weight-only, on the calibration windows and on held-out windows.
TEST(Awq, BeatsRtnOnBlockOutputMse) {
  for (std::string arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    BlockData d = block_data(ck, 1, 4, 64);
    BlockData held = block_data(ck, 1, 4, 64, 4096);
    for (int group : {0, 64}) {
      QuantConfig qc = config("awq", 3, 16);
      qc.group_size = group;
      BlockQuantizer bq(cfg, qc, d.w, &d.stats(), DType::f32);
      AwqReport rep = init_awq(bq, cfg, qc, d.w, block_params(d.w), d.inps, d.fp_outs, d.stats());
      double awq = block_output_mse(cfg, bq.fused(d.w, DType::f32), d.inps, d.fp_outs, 16);
      double rtn = rtn_mse(cfg, d, 3, 16, group);
      double awq_held = block_output_mse(cfg, bq.fused(d.w, DType::f32), held.inps, held.fp_outs, 16);
      double rtn_held = rtn_mse(cfg, held, 3, 16, group);
      // How many weight groups the clipping search shrank (γ = 30 means r = 1).
      int64_t clipped = 0, groups = 0;
      for (const ag::Var& v : bq.lwc_params())
        for (float g : v->value.to_f32_vector()) clipped += g != 30.0f, ++groups;
      // Scales only (clipping undone), to show what each stage contributes.
      for (const ag::Var& v : bq.lwc_params()) v->value.copy_from(Tensor::full(v->value.shape(), 30.0f, DType::f32));
      double awq_noclip = block_output_mse(cfg, bq.fused(d.w, DType::f32), d.inps, d.fp_outs, 16);
      std::printf("%s W3A16 g%d block MSE calib: RTN %.4e, AWQ %.4e (scales only %.4e); held-out: RTN %.4e, AWQ %.4e; "
                  "alpha qkv %.2f out %.2f fc1 %.2f; clipped %lld/%lld groups\n",
                  arch.c_str(), group, rtn, awq, awq_noclip, rtn_held, awq_held, rep.alpha["qkv"], rep.alpha["out"],
                  rep.alpha["fc1"], static_cast<long long>(clipped / 2), static_cast<long long>(groups / 2));
      EXPECT_LE(awq, rtn) << arch << " g" << group;
      EXPECT_LE(awq_held, rtn_held) << arch << " g" << group << " held-out";
      EXPECT_GT(clipped, 0) << "the clipping search should shrink some groups at 3 bits";
    }
  }
}

// (d) SmoothQuant vs RTN, weight-activation, OPT nano.
TEST(SmoothQuant, BeatsRtnOnOptBlockOutputMse) {
  ModelCheckpoint ck(nano("opt"));
  const ModelConfig& cfg = ck.config();
  BlockData d = block_data(ck, 1, 4, 64);
  BlockData held = block_data(ck, 1, 4, 64, 4096);
  for (int bits : {8, 4}) {
    double rtn = rtn_mse(cfg, d, bits, bits), rtn_held = rtn_mse(cfg, held, bits, bits);
    for (float alpha : {0.5f, 0.75f}) {
      QuantConfig qc = config("smoothquant", bits, bits);
      qc.let_alpha = alpha;
      BlockQuantizer bq(cfg, qc, d.w, &d.stats(), DType::f32);
      init_smoothquant(bq, cfg, qc, d.w, d.stats());
      double sq = block_output_mse(cfg, bq.fused(d.w, DType::f32), d.inps, d.fp_outs, bits);
      double sq_held = block_output_mse(cfg, bq.fused(d.w, DType::f32), held.inps, held.fp_outs, bits);
      std::printf("opt W%dA%d block MSE calib: RTN %.4e, SmoothQuant(alpha %.2f) %.4e; held-out: RTN %.4e, SQ %.4e\n",
                  bits, bits, rtn, alpha, sq, rtn_held, sq_held);
      if (alpha == 0.5f) {
        EXPECT_LE(sq, rtn) << "W" << bits << "A" << bits;
        EXPECT_LE(sq_held, rtn_held) << "W" << bits << "A" << bits << " held-out";
      }
    }
  }
}

// The recorder's mean|x| (used by AWQ) is the running mean over every token of every call.
TEST(ActivationStats, AbsMeanIsMeanOfAbsoluteValuesOverAllTokens) {
  ActivationStatsRecorder rec;
  std::vector<double> sum(8, 0.0);
  int64_t rows = 0;
  for (uint64_t call = 0; call < 3; ++call) {
    int64_t n = 5 + static_cast<int64_t>(call) * 3;
    Tensor x = Tensor::uniform({1, n, 8}, -2.0f, 1.0f, 11 + call);
    std::vector<float> v = x.to_f32_vector();
    for (int64_t i = 0; i < n * 8; ++i) sum[static_cast<size_t>(i % 8)] += std::fabs(v[static_cast<size_t>(i)]);
    rows += n;
    ag::Tape t;
    rec.activation(t, "fc1", ag::constant(std::move(x)));
  }
  const ChannelStats& st = rec.stats().at("fc1");
  EXPECT_EQ(st.rows, rows);
  std::vector<float> got = st.absmean.to_f32_vector();
  for (size_t c = 0; c < 8; ++c) EXPECT_NEAR(got[c], sum[c] / rows, 1e-6) << c;
}

// calibrate_model may build the quantizer as OmniQuant's (method "omniquant" with let, + lwc for
// AWQ: qkt scale, OPT shifts, γ = 4 init): the init functions must then give the same fused block.
TEST(Baselines, QuantizerBuiltAsOmniQuantGivesTheSameFusedBlock) {
  ModelCheckpoint ck(nano("opt"));
  const ModelConfig& cfg = ck.config();
  BlockData d = block_data(ck, 1, 2, 48);
  auto as_omni = [](QuantConfig q, bool lwc) {
    q.method = "omniquant";
    q.let = true;
    q.lwc = lwc;
    return q;
  };
  auto max_diff = [&](BlockQuantizer& a, BlockQuantizer& b) {
    BlockWeights fa = a.fused(d.w, DType::f32), fb = b.fused(d.w, DType::f32);
    float m = 0;
    for (const auto& [k, t] : fa.tensors) m = std::max(m, test::max_abs_diff(t.to_f32_vector(), fb.get(k).to_f32_vector()));
    return m;
  };
  {
    QuantConfig qc = config("smoothquant", 8, 8);
    BlockQuantizer mine(cfg, qc, d.w, &d.stats(), DType::f32), omni(cfg, as_omni(qc, false), d.w, &d.stats(), DType::f32);
    ASSERT_TRUE(omni.learned().count("qkv.let_shift")) << "the OmniQuant build has OPT shifts";
    init_smoothquant(mine, cfg, qc, d.w, d.stats());
    init_smoothquant(omni, cfg, qc, d.w, d.stats());
    EXPECT_EQ(max_diff(mine, omni), 0.0f) << "SmoothQuant W8A8";
  }
  {
    QuantConfig qc = config("awq", 3, 16);
    BlockQuantizer mine(cfg, qc, d.w, &d.stats(), DType::f32), omni(cfg, as_omni(qc, true), d.w, &d.stats(), DType::f32);
    AwqReport a = init_awq(mine, cfg, qc, d.w, block_params(d.w), d.inps, d.fp_outs, d.stats());
    AwqReport b = init_awq(omni, cfg, qc, d.w, block_params(d.w), d.inps, d.fp_outs, d.stats());
    EXPECT_EQ(a.alpha, b.alpha);
    // Equal unless an AWQ scale fell below OmniQuant's training floor |s| >= 1e-2 (then only close).
    float m = max_diff(mine, omni);
    std::printf("AWQ fused block, quantizer built as awq vs as omniquant: max |diff| %.3e\n", m);
    EXPECT_EQ(m, 0.0f);
  }
}
