#include "quant/smoothquant.h"

#include <algorithm>
#include <cmath>

#include "ops/reduce.h"
#include "runtime/error.h"

namespace omniq {

std::vector<float> pair_channel_stat(const ModelConfig& cfg, const TransformPair& p, const std::vector<float>& v,
                                     bool mean) {
  if (static_cast<int64_t>(v.size()) == p.channels) return v;
  const int64_t H = cfg.num_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;
  OMNIQ_CHECK(static_cast<int64_t>(v.size()) == H * D && p.channels == Hkv * D,
              "pair %s: statistic of %zu channels cannot be mapped onto %lld pair channels", p.name.c_str(), v.size(),
              static_cast<long long>(p.channels));
  std::vector<float> r(static_cast<size_t>(p.channels), mean ? 0.0f : -INFINITY);
  const int64_t group = H / Hkv;  // query heads per kv head
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      float x = v[static_cast<size_t>(h * D + d)];
      float& slot = r[static_cast<size_t>((h / group) * D + d)];
      slot = mean ? slot + x / static_cast<float>(group) : std::max(slot, x);
    }
  return r;
}

void init_smoothquant(BlockQuantizer& bq, const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w,
                      const std::map<std::string, ChannelStats>& stats) {
  const double alpha = qc.let_alpha;
  OMNIQ_CHECK(alpha >= 0.0 && alpha <= 1.0, "SmoothQuant: alpha %g must lie in [0, 1]", alpha);
  // A BlockQuantizer built as OmniQuant's (method "omniquant", let) also has the qkt scale and, on
  // OPT weight-activation, shifts: SmoothQuant uses neither, so they are set to the identity.
  for (auto& [name, v] : bq.learned()) {
    bool shift = name.find(".let_shift") != std::string::npos, qkt = name.rfind("qkt.", 0) == 0;
    if (shift || qkt) v->value.copy_from(Tensor::full(v->value.shape(), shift ? 0.0f : 1.0f, DType::f32));
  }
  for (const TransformPair& p : block_transform_pairs(cfg)) {
    if (p.kind == TransformPair::Kind::q_rows_to_k_rows) continue;
    auto slot = bq.learned().find(p.name + ".let_scale");
    OMNIQ_CHECK(slot != bq.learned().end(),
                "SmoothQuant: the BlockQuantizer has no %s.let_scale (construct it with method \"smoothquant\")",
                p.name.c_str());
    auto it = stats.find(p.consumers[0]);
    OMNIQ_CHECK(it != stats.end() && it->second.absmax.defined(),
                "SmoothQuant: no activation statistics recorded for %s", p.consumers[0].c_str());
    std::vector<float> act = pair_channel_stat(cfg, p, it->second.absmax.to_f32_vector(), false);
    // One scale serves all consumers: SmoothQuant takes the max over their concatenated weights.
    std::vector<float> wabs;
    for (const std::string& c : p.consumers) {
      std::vector<float> col = col_absmax(w.get(c + ".weight")).to_f32_vector();
      if (wabs.empty()) wabs.assign(col.size(), 0.0f);
      for (size_t i = 0; i < col.size(); ++i) wabs[i] = std::max(wabs[i], col[i]);
    }
    wabs = pair_channel_stat(cfg, p, wabs, false);
    std::vector<float> s(act.size());
    for (size_t i = 0; i < s.size(); ++i) {
      double a = std::max(act[i], 1e-5f), b = std::max(wabs[i], 1e-5f);
      s[i] = static_cast<float>(std::max(std::pow(a, alpha) / std::pow(b, 1.0 - alpha), 1e-5));
    }
    ag::Var& v = slot->second;
    v->value.copy_from(Tensor::from_f32(s, v->value.shape(), DType::f32, Device::cpu()));
  }
}

}  // namespace omniq
