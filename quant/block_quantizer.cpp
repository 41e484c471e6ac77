#include "quant/block_quantizer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "autograd/functions.h"
#include "autograd/quant_functions.h"
#include "ops/activation.h"
#include "ops/elementwise.h"
#include "ops/fake_quant_let.h"
#include "ops/fake_quant_lwc_update.h"
#include "ops/reduce.h"
#include "runtime/error.h"

namespace omniq {

// ---------------------------------------------------------------------------------------------
// statistics

namespace {
void merge_max(Tensor& acc, Tensor v, bool take_max) {
  if (!acc.defined()) {
    acc = std::move(v);
    return;
  }
  std::vector<float> a = acc.to_f32_vector(), b = v.to_f32_vector();
  for (size_t i = 0; i < a.size(); ++i) a[i] = take_max ? std::max(a[i], b[i]) : std::min(a[i], b[i]);
  acc = Tensor::from_f32(a, acc.shape(), DType::f32, acc.device());
}

std::pair<std::string, std::string> split_key(const std::string& key) {
  size_t dot = key.rfind('.');
  OMNIQ_CHECK(dot != std::string::npos, "parameter key '%s' has no '.weight'/'.bias' suffix", key.c_str());
  return {key.substr(0, dot), key.substr(dot + 1)};
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}
}  // namespace

ag::Var ActivationStatsRecorder::activation(ag::Tape&, const std::string& site, const ag::Var& x) {
  if (site == "q" || site == "k" || site == "v") return x;
  ChannelStats& s = stats_[site];
  merge_max(s.absmax, col_absmax(x->value), true);
  merge_max(s.max, col_max(x->value), true);
  merge_max(s.min, col_min(x->value), false);
  // Σ|x| per column as relu(x) + relu(−x) (stays on the device); running mean on the host ([C] only).
  Tensor abssum = col_sum(relu_forward(x->value));
  std::vector<float> a = abssum.to_f32_vector(), b = col_sum(relu_forward(scale(x->value, -1.0f))).to_f32_vector();
  int64_t n = x->value.numel() / x->value.size(-1);
  std::vector<float> m = s.absmean.defined() ? s.absmean.to_f32_vector() : std::vector<float>(a.size(), 0.0f);
  for (size_t i = 0; i < a.size(); ++i)
    m[i] = static_cast<float>((static_cast<double>(m[i]) * s.rows + a[i] + b[i]) / static_cast<double>(s.rows + n));
  s.rows += n;
  s.absmean = Tensor::from_f32(m, {static_cast<int64_t>(m.size())}, DType::f32, x->value.device());
  return x;
}

// ---------------------------------------------------------------------------------------------
// construction and initialisation

BlockQuantizer::BlockQuantizer(const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& weights,
                               const std::map<std::string, ChannelStats>* stats, DType compute)
    : cfg_(cfg), qc_(qc), compute_(compute), originals_(block_params(weights)) {
  Device dev = weights.get(block_linear_sites(cfg)[0] + ".weight").device();
  bool omni = qc.method == "omniquant";
  bool smooth = qc.method == "smoothquant", awq = qc.method == "awq";  // fixed (untrained) scales
  let_floor_ = omni ? qc.let_scale_floor : 1e-5f;
  const int64_t H = cfg.num_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;

  // GQA: q channel h*D+d reads kv channel (h / (H/Hkv))*D + d.
  std::vector<int32_t> kv_of_q(static_cast<size_t>(H * D));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) kv_of_q[static_cast<size_t>(h * D + d)] = static_cast<int32_t>((h / (H / Hkv)) * D + d);
  kv_to_q_index_ = Tensor::from_i32(kv_of_q, {H * D}, dev);
  // RoPE rotates channel d with d + D/2: the qkt scale must be equal on both (spec §4).
  std::vector<int32_t> tie(static_cast<size_t>(Hkv * D));
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t d = 0; d < D; ++d) tie[static_cast<size_t>(h * D + d)] = static_cast<int32_t>(h * (D / 2) + d % (D / 2));
  rope_tie_index_ = Tensor::from_i32(tie, {Hkv * D}, dev);

  // LWC: γ, β per weight group, initialised to 4 (σ(4) ≈ 0.982).
  // AWQ: σ(30) rounds to 1.0f, so the clipped range equals the plain min–max until init_awq sets it.
  float gamma0 = awq ? 30.0f : 4.0f;
  if (((omni && qc.lwc) || awq) && qc.weight_quant()) {
    for (const std::string& site : block_linear_sites(cfg)) {
      const Tensor& w = weights.get(site + ".weight");
      int64_t g = qc.group_size > 0 ? qc.group_size : w.size(1);
      WeightQuantSpec{qc.wbits, qc.group_size, qc.symmetric}.validate(w.size(1), site.c_str());
      int64_t n = w.size(0) * (w.size(1) / g);
      learned_[site + ".lwc_gamma"] = ag::parameter(Tensor::full({n}, gamma0, DType::f32, dev), site + ".lwc_gamma");
      learned_[site + ".lwc_beta"] = ag::parameter(Tensor::full({n}, gamma0, DType::f32, dev), site + ".lwc_beta");
    }
  }
  if (!((omni && qc.let) || smooth || awq)) return;

  pairs_ = block_transform_pairs(cfg);
  if (!omni) {  // SmoothQuant / AWQ scale the qkv, out, fc1 pairs only
    pairs_.erase(std::remove_if(pairs_.begin(), pairs_.end(),
                                [](const TransformPair& p) { return p.kind == TransformPair::Kind::q_rows_to_k_rows; }),
                 pairs_.end());
  }
  for (const TransformPair& p : pairs_) {
    bool shift = omni && cfg.is_opt() && qc.act_quant() && p.producer_has_bias && p.kind != TransformPair::Kind::q_rows_to_k_rows;
    for (const std::string& c : p.consumers) shift = shift && weights.has(c + ".bias");
    pair_has_shift_[p.name] = shift;

    if (p.kind == TransformPair::Kind::q_rows_to_k_rows) {
      int64_t n = cfg.is_llama() ? p.channels / 2 : p.channels;
      learned_[p.name + ".let_scale"] = ag::parameter(Tensor::full({n}, 1.0f, DType::f32, dev), p.name + ".let_scale");
      continue;
    }
    OMNIQ_CHECK(stats != nullptr, "LET needs calibration activation statistics");
    const std::string& first = p.consumers[0];
    auto it = stats->find(first);
    OMNIQ_CHECK(it != stats->end(), "LET: no activation statistics recorded for %s", first.c_str());
    std::vector<float> act = it->second.absmax.to_f32_vector();
    std::vector<float> amax = it->second.max.to_f32_vector(), amin = it->second.min.to_f32_vector();
    std::vector<float> wabs(act.size(), 0.0f);
    for (const std::string& c : p.consumers) {
      const Tensor& cw = weights.get(c + ".weight");  // may be an f16 copy (fp16-exact weights)
      std::vector<float> col = col_absmax(cw.dtype() == DType::f16 ? cw.to(DType::f32) : cw.alias()).to_f32_vector();
      for (size_t i = 0; i < col.size(); ++i) wabs[i] = std::max(wabs[i], col[i]);
    }
    // The out pair's statistics are over o_proj's inputs (H·D); its scale lives on v's rows (Hkv·D):
    // take the max over the query heads that share a kv head.
    auto reduce_to = [&](std::vector<float> v, bool is_min) {
      if (static_cast<int64_t>(v.size()) == p.channels) return v;
      std::vector<float> r(static_cast<size_t>(p.channels), is_min ? INFINITY : -INFINITY);
      for (size_t q = 0; q < v.size(); ++q) {
        float& slot = r[static_cast<size_t>(kv_of_q[q])];
        slot = is_min ? std::min(slot, v[q]) : std::max(slot, v[q]);
      }
      return r;
    };
    act = reduce_to(act, false);
    wabs = reduce_to(wabs, false);
    amax = reduce_to(amax, false);
    amin = reduce_to(amin, true);
    std::vector<float> s(act.size()), d(act.size());
    for (size_t i = 0; i < s.size(); ++i) {
      double a = std::max(act[i], 1e-5f), w = std::max(wabs[i], 1e-5f);
      s[i] = static_cast<float>(std::max(std::pow(a, qc.let_alpha) / std::pow(w, 1.0 - qc.let_alpha), 1e-5));
      d[i] = 0.5f * (amax[i] + amin[i]);
    }
    learned_[p.name + ".let_scale"] = ag::parameter(Tensor::from_f32(s, {p.channels}, DType::f32, dev), p.name + ".let_scale");
    if (shift) {
      learned_[p.name + ".let_shift"] = ag::parameter(Tensor::from_f32(d, {p.channels}, DType::f32, dev), p.name + ".let_shift");
    }
  }
}

std::vector<ag::Var> BlockQuantizer::lwc_params() const {
  std::vector<ag::Var> out;
  for (const auto& [name, v] : learned_)
    if (name.find(".lwc_") != std::string::npos) out.push_back(v);
  return out;
}

std::vector<ag::Var> BlockQuantizer::let_params() const {
  std::vector<ag::Var> out;
  for (const auto& [name, v] : learned_)
    if (name.find(".let_") != std::string::npos) out.push_back(v);
  return out;
}

// ---------------------------------------------------------------------------------------------
// the transform

ag::Var BlockQuantizer::scale_of(ag::Tape& t, const std::string& pair_name, bool expand_to_q) {
  ag::Var s = ag::abs_floor_ste(t, learned_.at(pair_name + ".let_scale"), let_floor_);
  if (pair_name == "qkt" && cfg_.is_llama()) s = ag::gather(t, s, rope_tie_index_);
  if (expand_to_q && cfg_.num_heads != cfg_.num_kv_heads) s = ag::gather(t, s, kv_to_q_index_);
  return s;
}

ag::Var BlockQuantizer::shift_of(const std::string& pair_name, bool expand_to_q) const {
  auto it = learned_.find(pair_name + ".let_shift");
  if (it == learned_.end()) return nullptr;
  OMNIQ_CHECK(!expand_to_q || cfg_.num_heads == cfg_.num_kv_heads, "LET shifts with GQA are not supported");
  return it->second;
}

ag::Var BlockQuantizer::linear_weight(ag::Tape&, const std::string& site) { return originals_.at(site + ".weight"); }

ag::Var BlockQuantizer::transform(ag::Tape& t, const std::string& key, const ag::Var& p, DType weight_dtype) {
  auto [prefix, leaf] = split_key(key);
  bool is_weight = leaf == "weight";
  ag::Var v = p;
  using K = TransformPair::Kind;
  bool is_linear = contains(block_linear_sites(cfg_), prefix);
  bool quantize = is_linear && is_weight && qc_.weight_quant() && !skip_weight_quant_;
  if (quantize) {
    if (ag::Var y = fused_let_weight(t, prefix, p, weight_dtype)) return y;
    if (ag::Var y = cached_lwc_weight(t, prefix, p, weight_dtype)) return y;
  }
  if (is_weight && is_linear && v->value.dtype() != DType::f32) {
    // An f16 copy of the weight (fp16-exact checkpoints): the LET ops below work in f32.
    for (const TransformPair& pr : pairs_)
      if (pr.producer == prefix || contains(pr.consumers, prefix)) {
        v = ag::cast(t, v, DType::f32);
        break;
      }
  }

  // 1. Consumer side (input columns), and the bias corrections b + W·δ with the original W.
  for (const TransformPair& pr : pairs_) {
    if (!contains(pr.consumers, prefix) || pr.kind == K::q_rows_to_k_rows) continue;
    bool to_q = pr.kind == K::rows_to_columns;  // o_proj's columns are query-head channels
    if (is_weight) {
      v = ag::mul(t, v, scale_of(t, pr.name, to_q));
    } else if (ag::Var d = shift_of(pr.name, to_q)) {
      ag::Var w = linear_weight(t, prefix);
      ag::Var wd = ag::reshape(t, ag::linear(t, ag::reshape(t, d, {1, d->value.numel()}), w), {w->value.size(0)});
      v = ag::add(t, v, wd);
    }
  }
  // 2. Producer side (output rows of a Linear, or the norm itself).
  for (const TransformPair& pr : pairs_) {
    if (pr.producer != prefix) continue;
    if (pr.kind == K::norm_to_linears || pr.kind == K::rows_to_columns) {
      ag::Var s = scale_of(t, pr.name, false);
      if (!is_weight) {
        if (ag::Var d = shift_of(pr.name, false)) v = ag::sub(t, v, d);
      }
      if (pr.kind == K::rows_to_columns && is_weight) s = ag::reshape(t, s, {s->value.numel(), 1});
      v = ag::div(t, v, s);
    } else {  // qkt: q rows ÷ s
      ag::Var s = scale_of(t, pr.name, true);
      if (is_weight) s = ag::reshape(t, s, {s->value.numel(), 1});
      v = ag::div(t, v, s);
    }
  }
  for (const TransformPair& pr : pairs_) {  // qkt consumer: k rows · s
    if (pr.kind != K::q_rows_to_k_rows || !contains(pr.consumers, prefix)) continue;
    ag::Var s = scale_of(t, pr.name, false);
    if (is_weight) s = ag::reshape(t, s, {s->value.numel(), 1});
    v = ag::mul(t, v, s);
  }
  // 3. Weight fake-quant (+ LWC) of Linear weights.
  if (quantize) {
    auto [gamma, beta] = lwc_of(prefix);
    v = ag::fake_quant_weight(t, v, WeightQuantSpec{qc_.wbits, qc_.group_size, qc_.symmetric}, gamma, beta,
                              weight_dtype);
  }
  return v;
}

std::pair<ag::Var, ag::Var> BlockQuantizer::lwc_of(const std::string& site) const {
  auto g = learned_.find(site + ".lwc_gamma");
  if (g == learned_.end()) return {nullptr, nullptr};
  return {g->second, learned_.at(site + ".lwc_beta")};
}

ag::Var BlockQuantizer::fused_let_weight(ag::Tape& t, const std::string& site, const ag::Var& w, DType weight_dtype) {
  // The scales this weight takes, as the op chain of transform() applies them: input columns ·
  // (consumer of a pair), output rows ÷ (producer of out / qkt) or · (k_proj, consumer of qkt).
  using K = TransformPair::Kind;
  const Tensor& wv = w->value;
  const WeightQuantSpec spec{qc_.wbits, qc_.group_size, qc_.symmetric};
  static const bool disabled = std::getenv("OMNIQ_NO_LET_FUSION") != nullptr;  // A/B switch for measurements
  if (disabled || pairs_.empty() || !fake_quant_let_supported(wv.size(0), wv.size(1), spec)) return nullptr;
  std::vector<ag::Var> cols, rows;
  bool divide = false;
  for (const TransformPair& pr : pairs_) {
    if (contains(pr.consumers, site) && pr.kind != K::q_rows_to_k_rows) {
      cols.push_back(scale_of(t, pr.name, pr.kind == K::rows_to_columns));
    }
    if (pr.producer == site && pr.kind == K::rows_to_columns) {
      rows.push_back(scale_of(t, pr.name, false));
      divide = true;
    }
    if (pr.producer == site && pr.kind == K::q_rows_to_k_rows) {
      rows.push_back(scale_of(t, pr.name, true));
      divide = true;
    }
    if (pr.kind == K::q_rows_to_k_rows && contains(pr.consumers, site)) {
      rows.push_back(scale_of(t, pr.name, false));
      divide = false;
    }
  }
  if (cols.empty() && rows.empty()) return nullptr;  // no LET on this weight: plain fake-quant
  if (cols.size() > 1 || rows.size() > 1) return nullptr;  // not an architecture we know: compose
  auto [gamma, beta] = lwc_of(site);
  return ag::fake_quant_weight_let(t, w, spec, gamma, beta,
                                   cols.empty() ? nullptr : cols[0], rows.empty() ? nullptr : rows[0], divide,
                                   weight_dtype);
}

// ---------------------------------------------------------------------------------------------
// the fused LWC step

bool BlockQuantizer::site_has_let(const std::string& site) const {
  for (const TransformPair& pr : pairs_)
    if (pr.producer == site || contains(pr.consumers, site)) return true;
  return false;
}

int BlockQuantizer::enable_fused_lwc_update(const std::vector<LwcAdamWSlot>& slots, const Tensor& scalars) {
  fused_lwc_.clear();
  if (!qc_.weight_quant()) return 0;
  const WeightQuantSpec spec{qc_.wbits, qc_.group_size, qc_.symmetric};
  auto find = [&](const ag::Var& p) -> const LwcAdamWSlot* {
    for (const LwcAdamWSlot& s : slots)
      if (s.param == p) return &s;
    return nullptr;
  };
  std::map<std::string, std::shared_ptr<ag::FusedLwcWeight>> caches;
  for (const std::string& site : block_linear_sites(cfg_)) {
    auto [gamma, beta] = lwc_of(site);
    if (!gamma || site_has_let(site)) continue;  // LET weights keep fake_quant_weight_let
    const Tensor& w = originals_.at(site + ".weight")->value;
    if (!fake_quant_lwc_update_supported(spec, w.dtype(), compute_)) continue;
    const LwcAdamWSlot* sg = find(gamma);
    const LwcAdamWSlot* sb = find(beta);
    if (!sg || !sb) continue;
    auto c = std::make_shared<ag::FusedLwcWeight>();
    c->spec = spec;
    c->m_gamma = sg->m.alias();
    c->v_gamma = sg->v.alias();
    c->m_beta = sb->m.alias();
    c->v_beta = sb->v.alias();
    c->scalars = scalars.alias();
    c->slot_gamma = sg->slot;
    c->slot_beta = sb->slot;
    caches[site] = std::move(c);
  }
  fused_lwc_ = std::move(caches);
  refresh_fused_lwc_cache();
  return static_cast<int>(fused_lwc_.size());
}

void BlockQuantizer::refresh_fused_lwc_cache() {
  for (auto& [site, c] : fused_lwc_) {
    auto [gamma, beta] = lwc_of(site);
    // The unfused forward's op, so the cache holds exactly the ŵ the unfused step would compute.
    Tensor w_hat = fake_quant_weight_forward(originals_.at(site + ".weight")->value, c->spec, &gamma->value,
                                             &beta->value, compute_);
    if (c->w_hat.defined()) c->w_hat.copy_from(w_hat);  // keep the address a captured graph uses
    else c->w_hat = std::move(w_hat);
  }
}

ag::Var BlockQuantizer::cached_lwc_weight(ag::Tape& t, const std::string& site, const ag::Var& w, DType weight_dtype) {
  if (in_fused_) return nullptr;
  auto it = fused_lwc_.find(site);
  if (it == fused_lwc_.end()) return nullptr;
  const ag::FusedLwcWeight& c = *it->second;
  const Tensor& orig = originals_.at(site + ".weight")->value;
  // Only for the weight the cache was computed from, in the dtype it holds.
  if (weight_dtype != c.w_hat.dtype() || w->value.data() != orig.data() || w->value.shape() != orig.shape() ||
      w->value.dtype() != orig.dtype())
    return nullptr;
  auto [gamma, beta] = lwc_of(site);
  return ag::fake_quant_weight_cached(t, w, gamma, beta, it->second);
}

bool BlockQuantizer::fuses_all_let(const ModelConfig& cfg, const QuantConfig& qc) {
  if (!(qc.method == "omniquant" && qc.let && qc.weight_quant())) return false;
  if (cfg.is_opt() && qc.act_quant()) return false;  // LET shifts: bias corrections use the weights
  const WeightQuantSpec spec{qc.wbits, qc.group_size, qc.symmetric};
  const int64_t q_width = cfg.num_heads * cfg.head_dim;  // o_proj's input
  return fake_quant_let_supported(1, cfg.hidden_size, spec) && fake_quant_let_supported(1, q_width, spec);
}

ag::Var BlockQuantizer::param(ag::Tape& t, const std::string& key, const ag::Var& p) {
  // Linear weights and biases run in the compute dtype; norm parameters stay f32. A fake-quantized
  // weight comes out of the quantizer in the compute dtype already (one pass over the weight, and
  // its f32 gradient goes straight back into the quantizer's backward), so the cast is then a no-op.
  bool is_linear = contains(block_linear_sites(cfg_), split_key(key).first);
  ag::Var v = transform(t, key, p, is_linear ? compute_ : DType::f32);
  return is_linear ? ag::cast(t, v, compute_) : v;
}

ag::Var BlockQuantizer::activation(ag::Tape& t, const std::string& site, const ag::Var& x) {
  return ag::fake_quant_act(t, x, qc_.abits);
}

BlockWeights BlockQuantizer::fused(const BlockWeights& weights, DType out_dtype) {
  struct InFused {  // the final weights are computed by the unfused ops from γ, β, never from a cache
    bool& f;
    explicit InFused(bool& flag) : f(flag) { f = true; }
    ~InFused() { f = false; }
  } in_fused(in_fused_);
  BlockWeights out;
  out.what = weights.what + " (quantized)";
  ag::Tape t;  // records (the parameters require grad) but is never run backward
  for (const auto& [key, tensor] : weights.tensors) {
    bool is_linear = contains(block_linear_sites(cfg_), split_key(key).first);
    const DType want = is_linear ? out_dtype : DType::f32;
    ag::Var v = transform(t, key, originals_.at(key), want);
    // A fresh result already in the wanted dtype is taken as is; the originals are always copied.
    bool fresh = !v->value.shares_storage_with(originals_.at(key)->value) && v->value.dtype() == want;
    out.tensors[key] = fresh ? v->value.alias() : v->value.to(want);
    t.clear();
  }
  return out;
}

BlockWeights BlockQuantizer::fused_unquantized(const BlockWeights& weights) {
  skip_weight_quant_ = true;
  BlockWeights out;
  try {
    out = fused(weights, DType::f32);
  } catch (...) {
    skip_weight_quant_ = false;
    throw;
  }
  skip_weight_quant_ = false;
  out.what = weights.what + " (LET fused, not quantized)";
  return out;
}

}  // namespace omniq
