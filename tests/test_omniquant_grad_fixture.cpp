// OmniQuant's loss and gradients on a real block against an independent PyTorch implementation
// (tests/reference/omniquant_reference.py gradfix, block math in tests/reference/omniquant_block.py).
//
// The fixture (tests/fixtures/omniquant_grads/<model>.safetensors, generated on the GPU machine)
// holds block 1's input x [2, 64, C] (embedding -> fp block 0 of the nano model), the fp target
// block_1(x), and per case (W3A16 LWC+LET; W4A4 LWC+LET, with shifts on OPT) the LET init from the
// calibration statistics of x, deterministic non-trivial parameter values, the loss MSE(block_q(x),
// target), the loss of the fused block, and the gradient of every learned parameter. Here we build
// our BlockQuantizer on the same block, set the same values and compare.
//
// Tolerances, and why they can be tight: both sides follow the same surrogate (round_ste on x/scale,
// plain round on the zero point, clamps pass inside the range, amax/amin ties share, |s| floor passed
// straight through), and the weight quantizer is the same sequence of fp32 operations on both (σ in
// fp64), so the fake-quantized weights agree bit for bit. What differs is summation order in matmuls,
// norms and softmax (~1e-7 relative). Weight-only (A16): loss rel 1e-5, gradients rel L2 < 1e-3 and
// cosine > 0.9999. With 4-bit per-token activation quantizers a ~1e-7 difference can move an element
// across a rounding boundary (one quantization step of one activation), so W-A cases allow loss rel
// 2e-4, gradient rel L2 < 1e-2, cosine > 0.9995. A real bug (wrong pair, order, STE rule, GQA or RoPE
// tie) shows up as O(0.1-1) errors. The fixture directory can be overridden with
// OMNIQ_GRAD_FIXTURE_DIR (used to try fixtures made elsewhere).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "autograd/functions.h"
#include "models/checkpoint.h"
#include "models/decoder_block.h"
#include "models/safetensors.h"
#include "quant/act_quant_hooks.h"
#include "quant/block_quantizer.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

std::string fixture_path(const std::string& model) {
  const char* dir = std::getenv("OMNIQ_GRAD_FIXTURE_DIR");
  std::string d = dir && *dir ? std::string(dir) : test::source_path("tests/fixtures/omniquant_grads");
  return d + "/" + model + ".safetensors";
}

bool file_exists(const std::string& p) { return std::ifstream(p).good(); }

struct Compare {
  double rel_l2 = 0, cosine = 1;
};

Compare compare(const std::vector<float>& got, const std::vector<float>& ref) {
  double d2 = 0, r2 = 0, g2 = 0, dot = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double g = got[i], r = ref[i];
    d2 += (g - r) * (g - r);
    r2 += r * r;
    g2 += g * g;
    dot += g * r;
  }
  Compare c;
  c.rel_l2 = r2 > 0 ? std::sqrt(d2 / r2) : std::sqrt(d2);
  c.cosine = (r2 > 0 && g2 > 0) ? dot / std::sqrt(r2 * g2) : (r2 == g2 ? 1.0 : 0.0);
  return c;
}

Tensor read_f32(const SafetensorsFile& f, const std::string& name) { return f.read(name).to(DType::f32); }

void check_model(const std::string& model) {
  std::string path = fixture_path(model);
  if (!file_exists(path)) {
    GTEST_SKIP() << path << " is absent: generate it on the GPU machine with "
                 << "`python3 tests/reference/omniquant_reference.py gradfix` and commit it";
  }
  SafetensorsFile f(path);
  const auto& meta = f.metadata();
  ASSERT_TRUE(meta.count("cases") && meta.count("block")) << path << ": metadata lacks cases/block";
  ModelCheckpoint ck(test::source_path("data/models/" + model));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(std::stoll(meta.at("block")), DType::f32, Device::cpu());
  Tensor x = read_f32(f, "x"), target = read_f32(f, "target");

  // The fp block first: if this disagrees, everything below is noise.
  Tensor fp = decoder_block_forward(cfg, w, x);
  float fp_err = test::max_rel_error(fp.to_f32_vector(), target.to_f32_vector());
  std::printf("%s: fp block 1 vs PyTorch max rel err %.2e\n", model.c_str(), fp_err);
  EXPECT_LT(fp_err, 1e-5f) << "the full-precision block already differs from the PyTorch reference";

  ActivationStatsRecorder stats;  // LET init statistics over the same x, as the reference
  {
    ag::Tape t;
    decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &stats);
  }

  for (const auto& c : nlohmann::json::parse(meta.at("cases"))) {
    std::string cn = c.at("name");
    SCOPED_TRACE(model + " " + cn);
    QuantConfig qc;
    qc.method = "omniquant";
    qc.wbits = c.at("wbits");
    qc.abits = c.at("abits");
    qc.group_size = c.at("group");
    qc.lwc = c.at("lwc");
    qc.let = c.at("let");
    qc.let_alpha = c.at("alpha");
    bool wa = qc.act_quant();
    BlockQuantizer bq(cfg, qc, w, &stats.stats(), DType::f32);

    // Same set of learned parameters, same LET init, then the fixture's values.
    std::set<std::string> ours, theirs;
    for (auto& [name, v] : bq.learned()) ours.insert(name);
    std::string pfx = cn + ".param.";
    for (const std::string& n : f.names())
      if (n.rfind(pfx, 0) == 0) theirs.insert(n.substr(pfx.size()));
    ASSERT_EQ(ours, theirs) << "learned parameter names differ from the reference's";
    for (auto& [name, v] : bq.learned()) {
      std::string init = cn + ".init." + name;
      if (f.has(init)) {
        float e = test::max_rel_error(v->value.to_f32_vector(), read_f32(f, init).to_f32_vector());
        std::printf("%s %s: init %s max rel err %.2e\n", model.c_str(), cn.c_str(), name.c_str(), e);
        EXPECT_LT(e, 1e-4f) << name << ": LET init from the calibration statistics differs";
      }
      Tensor p = read_f32(f, pfx + name);
      ASSERT_EQ(p.numel(), v->value.numel()) << name;
      v->value.copy_from(p.reshape(v->value.shape()));
    }

    // Loss and gradients with our autograd.
    ag::Tape t;
    ag::Var y = decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), &bq);
    ag::Var loss = ag::mse_loss(t, y, ag::constant(target.alias()));
    t.backward(loss);
    double ref_loss = read_f32(f, cn + ".loss").to_f32_vector()[0];
    double got_loss = loss->value.item();
    double loss_rel = std::fabs(got_loss - ref_loss) / std::fabs(ref_loss);
    std::printf("%s %s: loss ours %.9g ref %.9g rel %.2e\n", model.c_str(), cn.c_str(), got_loss, ref_loss, loss_rel);
    EXPECT_LT(loss_rel, wa ? 2e-4 : 1e-5) << "loss differs";

    // A gradient that is zero by invariance is only rounding noise on both sides and cannot be
    // compared relatively: with A16 the qkt pair (q rows ÷ s, k rows · s) only rescales whole rows
    // of q_proj/k_proj, per-row (and per-group) min-max quantization is scale-equivariant, so QKᵀ
    // and the loss do not depend on s at all (measured: |grad| ~1e-10 vs ~1e-5 for other LET
    // scales, ~1e-7 for LWC). Such gradients (reference norm < 1e-5 of the case's largest) must be
    // just as negligible here.
    double gmax = 0;
    for (auto& [name, v] : bq.learned()) {
      std::vector<float> r = read_f32(f, cn + ".grad." + name).to_f32_vector();
      double n2 = 0;
      for (float e : r) n2 += static_cast<double>(e) * e;
      gmax = std::max(gmax, std::sqrt(n2));
    }
    double worst_l2 = 0, worst_cos = 1;
    for (auto& [name, v] : bq.learned()) {
      ASSERT_TRUE(v->grad.defined()) << name << ": no gradient reached it";
      std::vector<float> got = v->grad.to_f32_vector(), ref = read_f32(f, cn + ".grad." + name).to_f32_vector();
      double gn = 0, rn = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        gn += static_cast<double>(got[i]) * got[i];
        rn += static_cast<double>(ref[i]) * ref[i];
      }
      gn = std::sqrt(gn);
      rn = std::sqrt(rn);
      if (rn < 1e-5 * gmax) {
        std::printf("  %-22s grad |ref| %.2e |ours| %.2e: zero by invariance (largest %.2e)\n", name.c_str(), rn, gn,
                    gmax);
        EXPECT_LT(gn, 1e-5 * gmax) << name << ": the reference's gradient is zero up to rounding, ours is not";
        continue;
      }
      Compare cmp = compare(got, ref);
      std::printf("  %-22s grad rel L2 %.2e cosine %.8f |ref| %.2e\n", name.c_str(), cmp.rel_l2, cmp.cosine, rn);
      EXPECT_LT(cmp.rel_l2, wa ? 1e-2 : 1e-3) << name;
      EXPECT_GT(cmp.cosine, wa ? 0.9995 : 0.9999) << name;
      worst_l2 = std::max(worst_l2, cmp.rel_l2);
      worst_cos = std::min(worst_cos, cmp.cosine);
    }
    std::printf("%s %s: worst gradient rel L2 %.2e, worst cosine %.8f\n", model.c_str(), cn.c_str(), worst_l2,
                worst_cos);

    // The fused block (what is exported) gives the reference's fused loss.
    BlockWeights fused = bq.fused(w, DType::f32);
    ActivationQuantHooks act(qc.abits);
    ag::Tape t2;
    ag::Var yf = decoder_block_forward(t2, cfg, block_params(fused), ag::constant(x.alias()), wa ? &act : nullptr);
    double got_fused = ag::mse_loss(t2, yf, ag::constant(target.alias()))->value.item();
    double ref_fused = read_f32(f, cn + ".loss_fused").to_f32_vector()[0];
    double fused_rel = std::fabs(got_fused - ref_fused) / std::fabs(ref_fused);
    std::printf("%s %s: fused loss ours %.9g ref %.9g rel %.2e\n", model.c_str(), cn.c_str(), got_fused, ref_fused,
                fused_rel);
    EXPECT_LT(fused_rel, wa ? 2e-4 : 1e-5) << "fused block loss differs";
  }
}

}  // namespace

TEST(OmniQuantGradFixture, LlamaNanoBlockMatchesPyTorch) { check_model("llama-nano"); }
TEST(OmniQuantGradFixture, OptNanoBlockMatchesPyTorch) { check_model("opt-nano"); }
