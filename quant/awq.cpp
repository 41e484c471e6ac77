#include "quant/awq.h"

#include <algorithm>
#include <cmath>

#include "autograd/functions.h"
#include "ops/elementwise.h"
#include "ops/fake_quant.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "quant/act_quant_hooks.h"
#include "quant/smoothquant.h"
#include "runtime/error.h"

namespace omniq {

namespace {

constexpr int kAlphaGrid = 20;         // α = i / 20, i < 20 (the AWQ code's n_grid)
constexpr int kClipSteps = 20;         // r = 1 − 0.5·i/20, i = 0..20
constexpr int64_t kClipTokens = 1024;  // tokens per Linear kept for the clipping search
constexpr int64_t kClipSamples = 8;    // samples they are taken from (evenly spaced)
constexpr float kNoClip = 30.0f;       // σ(30) = 1 − 9e-14 → 1.0f
constexpr int64_t kMaxChunk = int64_t{1} << 26;  // elements of one [groups, tokens, out] error tensor

void set_values(ag::Var& v, const std::vector<float>& x) {
  v->value.copy_from(Tensor::from_f32(x, v->value.shape(), DType::f32, Device::cpu()));
}

// Records, for every Linear input, every `stride`-th token (host f32, row-major [tokens, in]).
struct InputCapture : BlockHooks {
  std::vector<std::string> sites;
  int64_t stride = 1;
  std::map<std::string, std::vector<float>> rows;
  ag::Var activation(ag::Tape&, const std::string& site, const ag::Var& x) override {
    if (std::find(sites.begin(), sites.end(), site) == sites.end()) return x;
    std::vector<float> v = x->value.to_f32_vector();
    int64_t C = x->value.size(-1), n = x->value.numel() / C;
    std::vector<float>& out = rows[site];
    for (int64_t r = 0; r < n; r += stride) out.insert(out.end(), v.begin() + r * C, v.begin() + (r + 1) * C);
    return x;
  }
};

// Chooses per weight group the shrink ratio minimising ‖X_g (w_g − ŵ_g(r))ᵀ‖² and returns the
// γ (= β) values in the LWC layout (group index = row·G + k).
std::vector<float> search_clipping(const std::vector<float>& x /*[M, in]*/, const Tensor& w /*[out, in] f32*/,
                                   const QuantConfig& qc, Device dev) {
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t M = static_cast<int64_t>(x.size()) / in;
  const int64_t g = qc.group_size > 0 ? qc.group_size : in, G = in / g;
  // Group-major layouts so that one batched GEMM gives every group's partial output error:
  // X [G, M, g] and W [G, out, g]. Each contiguous g-chunk of W is still one quantization group,
  // and all groups share γ within a trial, so the changed group order does not matter.
  std::vector<float> wh = w.to_f32_vector(), xp(static_cast<size_t>(G * M * g)), wp(static_cast<size_t>(G * out * g));
  for (int64_t k = 0; k < G; ++k) {
    for (int64_t m = 0; m < M; ++m)
      std::copy_n(x.begin() + m * in + k * g, g, xp.begin() + (k * M + m) * g);
    for (int64_t o = 0; o < out; ++o)
      std::copy_n(wh.begin() + o * in + k * g, g, wp.begin() + (k * out + o) * g);
  }
  Tensor X = Tensor::from_f32(xp, {G, M, g}, DType::f32, dev);
  Tensor W = Tensor::from_f32(wp, {G * out, g}, DType::f32, dev);
  Tensor ones = Tensor::full({G, 1, M}, 1.0f, DType::f32, dev);
  const WeightQuantSpec spec{qc.wbits, 0, qc.symmetric};  // per row of the [G·out, g] view = per group
  const int64_t chunk = std::max<int64_t>(1, kMaxChunk / std::max<int64_t>(1, M * out));

  std::vector<double> best(static_cast<size_t>(G * out), INFINITY);
  std::vector<float> best_gamma(static_cast<size_t>(G * out), kNoClip);
  for (int i = 0; i <= kClipSteps; ++i) {
    double r = 1.0 - 0.5 * i / kClipSteps;
    float gamma = i == 0 ? kNoClip : static_cast<float>(std::log(r / (1.0 - r)));
    Tensor gm = Tensor::full({G * out}, gamma, DType::f32, dev);
    Tensor dw = sub(W, fake_quant_weight_forward(W, spec, &gm, &gm)).reshape({G, out, g});
    std::vector<float> err;
    for (int64_t k0 = 0; k0 < G; k0 += chunk) {
      int64_t n = std::min(chunk, G - k0);
      Tensor y = bmm(X.view_rows(k0, n), dw.view_rows(k0, n), false, true);  // [n, M, out]
      Tensor e = bmm(ones.view_rows(k0, n), mul(y, y), false, false);         // [n, 1, out]
      std::vector<float> ev = e.to_f32_vector();
      err.insert(err.end(), ev.begin(), ev.end());
    }
    for (int64_t k = 0; k < G; ++k)
      for (int64_t o = 0; o < out; ++o) {
        double e = err[static_cast<size_t>(k * out + o)];
        size_t slot = static_cast<size_t>(o * G + k);
        if (e < best[slot]) {  // strict: ties keep the larger ratio
          best[slot] = e;
          best_gamma[slot] = gamma;
        }
      }
  }
  return best_gamma;
}

}  // namespace

std::vector<float> awq_scale(const std::vector<float>& absmean, double alpha) {
  std::vector<float> s(absmean.size());
  float lo = INFINITY, hi = 0.0f;
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = static_cast<float>(std::pow(std::max<double>(absmean[i], 1e-4), alpha));
    lo = std::min(lo, s[i]);
    hi = std::max(hi, s[i]);
  }
  float norm = static_cast<float>(std::sqrt(static_cast<double>(hi) * lo));
  for (float& v : s) v /= norm;
  return s;
}

double block_output_mse(const ModelConfig& cfg, const BlockWeights& fused, const Tensor& inps, const Tensor& fp_outs,
                        int abits) {
  OMNIQ_CHECK(inps.shape() == fp_outs.shape(), "block_output_mse: inputs and targets differ in shape");
  auto params = block_params(fused);
  ActivationQuantHooks act(abits);
  double sum = 0;
  for (int64_t j = 0; j < inps.size(0); ++j) {
    ag::Tape t;
    ag::Var y = decoder_block_forward(t, cfg, params, ag::constant(inps.view_rows(j, 1)), abits < 16 ? &act : nullptr);
    sum += mse_loss_forward(y->value, fp_outs.view_rows(j, 1)).item();
  }
  return sum / static_cast<double>(inps.size(0));
}

AwqReport init_awq(BlockQuantizer& bq, const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w,
                   const std::map<std::string, ag::Var>& /*params*/, const Tensor& inps, const Tensor& fp_outs,
                   const std::map<std::string, ChannelStats>& stats) {
  OMNIQ_CHECK(qc.method == "awq", "init_awq: qc.method is '%s', expected 'awq'", qc.method.c_str());
  OMNIQ_CHECK(inps.ndim() == 3 && inps.shape() == fp_outs.shape(), "init_awq: inps and fp_outs must both be [N, T, C]");
  const DType compute = inps.dtype();
  std::vector<TransformPair> pairs;
  for (const TransformPair& p : block_transform_pairs(cfg))
    if (p.kind != TransformPair::Kind::q_rows_to_k_rows) pairs.push_back(p);

  // Start from the identity transform (s = 1, and δ = 0 should bq have been built with OmniQuant's
  // shifts, which AWQ does not use) and no clipping.
  for (auto& [name, v] : bq.learned()) {
    bool lwc = name.find(".lwc_") != std::string::npos, shift = name.find(".let_shift") != std::string::npos;
    set_values(v, std::vector<float>(static_cast<size_t>(v->value.numel()), lwc ? kNoClip : shift ? 0.0f : 1.0f));
  }

  // 1. Scale search, pairs in forward order.
  AwqReport rep;
  for (const TransformPair& p : pairs) {
    auto slot = bq.learned().find(p.name + ".let_scale");
    OMNIQ_CHECK(slot != bq.learned().end(), "init_awq: the BlockQuantizer has no %s.let_scale (construct it with method \"awq\")",
                p.name.c_str());
    auto st = stats.find(p.consumers[0]);
    OMNIQ_CHECK(st != stats.end() && st->second.absmean.defined(),
                "init_awq: no mean|x| statistics for %s (record them with ActivationStatsRecorder)", p.consumers[0].c_str());
    std::vector<float> m = pair_channel_stat(cfg, p, st->second.absmean.to_f32_vector(), /*mean=*/true);
    std::vector<double>& losses = rep.loss_per_alpha[p.name];
    int best = 0;
    for (int i = 0; i < kAlphaGrid; ++i) {
      set_values(slot->second, awq_scale(m, static_cast<double>(i) / kAlphaGrid));
      losses.push_back(block_output_mse(cfg, bq.fused(w, compute), inps, fp_outs, qc.abits));
      if (losses.back() < losses[static_cast<size_t>(best)]) best = i;
    }
    rep.alpha[p.name] = static_cast<double>(best) / kAlphaGrid;
    set_values(slot->second, awq_scale(m, rep.alpha[p.name]));
  }
  if (!qc.weight_quant()) return rep;

  // 2. Clipping search on the scaled, unquantized block's Linear inputs and weights.
  QuantConfig fp_qc = qc;
  fp_qc.wbits = 16;
  fp_qc.abits = 16;
  BlockQuantizer fp_bq(cfg, fp_qc, w, &stats, DType::f32);
  for (const TransformPair& p : pairs) fp_bq.learned().at(p.name + ".let_scale")->value.copy_from(bq.learned().at(p.name + ".let_scale")->value);
  BlockWeights scaled = fp_bq.fused(w, DType::f32);
  BlockWeights scaled_c = fp_bq.fused(w, compute);

  InputCapture cap;
  cap.sites = block_linear_sites(cfg);
  const int64_t N = inps.size(0), T = inps.size(1);
  const int64_t ns = std::min(N, kClipSamples);
  cap.stride = std::max<int64_t>(1, (ns * T + kClipTokens - 1) / kClipTokens);
  auto sp = block_params(scaled_c);
  for (int64_t k = 0; k < ns; ++k) {
    ag::Tape t;
    decoder_block_forward(t, cfg, sp, ag::constant(inps.view_rows(k * N / ns, 1)), &cap);
  }
  for (const std::string& site : cap.sites) {
    std::vector<float> gamma = search_clipping(cap.rows.at(site), scaled.get(site + ".weight"), qc, inps.device());
    set_values(bq.learned().at(site + ".lwc_gamma"), gamma);
    set_values(bq.learned().at(site + ".lwc_beta"), gamma);
  }
  return rep;
}

}  // namespace omniq
