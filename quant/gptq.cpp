// GPTQ: host-side Hessian factorisation, the CPU column loop, Hessian accumulation and the
// sequential per-block driver. Algorithm and conventions: quant/gptq.h.
//
// The quantizer below is one fp32 operation at a time with FMA contraction off, so the CUDA twin
// (explicitly rounded intrinsics) gives the same bits, and with range_contains_zero = false and a
// diagonal H the result is bit-identical to ops/cpu/fake_quant.cpp's RTN.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "autograd/tape.h"
#include "ops/cpu/gemm.h"
#include "runtime/error.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace omniq {

namespace gptq_detail {

namespace {

// In-place lower Cholesky of the row-major n×n matrix a (upper part left untouched / ignored).
void cholesky_lower(std::vector<double>& a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double* rj = &a[static_cast<size_t>(j * n)];
    double d = rj[j];
    for (int64_t k = 0; k < j; ++k) d -= rj[k] * rj[k];
    OMNIQ_CHECK(d > 0 && std::isfinite(d),
                "gptq: the dampened Hessian is not positive definite (pivot %lld of %lld is %g): raise percdamp "
                "or use more calibration tokens",
                static_cast<long long>(j), static_cast<long long>(n), d);
    rj[j] = std::sqrt(d);
    for (int64_t i = j + 1; i < n; ++i) {
      double* ri = &a[static_cast<size_t>(i * n)];
      double s = ri[j];
      for (int64_t k = 0; k < j; ++k) s -= ri[k] * rj[k];
      ri[j] = s / rj[j];
    }
  }
}

// X = L⁻¹ for lower-triangular L, row by row (L X = I): row i of X is (e_i − Σ_{k<i} L_ik X_k) / L_ii,
// with contiguous row updates (X_k is zero right of column k).
std::vector<double> lower_inverse(const std::vector<double>& L, int64_t n) {
  std::vector<double> X(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double* xi = &X[static_cast<size_t>(i * n)];
    const double* li = &L[static_cast<size_t>(i * n)];
    xi[i] = 1.0;
    for (int64_t k = 0; k < i; ++k) {
      const double c = li[k];
      if (c == 0.0) continue;
      const double* xk = &X[static_cast<size_t>(k * n)];
      for (int64_t j = 0; j <= k; ++j) xi[j] -= c * xk[j];
    }
    const double inv = 1.0 / li[i];
    for (int64_t j = 0; j <= i; ++j) xi[j] *= inv;
  }
  return X;
}

}  // namespace

PreparedHessian prepare_hessian(const Tensor& H, const GptqOptions& opt) {
  OMNIQ_CHECK(H.ndim() == 2 && H.size(0) == H.size(1) && H.dtype() == DType::f32,
              "gptq: H must be a square f32 matrix, got %s", H.str().c_str());
  OMNIQ_CHECK(opt.percdamp >= 0, "gptq: percdamp must be >= 0, got %g", opt.percdamp);
  const int64_t n = H.size(0);
  std::vector<float> hf = H.to_f32_vector();
  std::vector<double> h(hf.begin(), hf.end());
  PreparedHessian ph;
  ph.n = n;
  ph.dead.assign(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    double& d = h[static_cast<size_t>(i * n + i)];
    if (d == 0.0) {
      ph.dead[static_cast<size_t>(i)] = 1;
      d = 1.0;  // the reference: H[dead, dead] = 1 (and W[:, dead] = 0 in the backends)
    }
  }
  ph.perm.resize(static_cast<size_t>(n));
  std::iota(ph.perm.begin(), ph.perm.end(), 0);
  if (opt.act_order) {
    // Descending diag(H); stable so ties keep their order (torch.argsort leaves ties unspecified).
    std::stable_sort(ph.perm.begin(), ph.perm.end(), [&](int32_t a, int32_t b) {
      return h[static_cast<size_t>(a) * n + a] > h[static_cast<size_t>(b) * n + b];
    });
  }
  double mean_diag = 0;
  for (int64_t i = 0; i < n; ++i) mean_diag += h[static_cast<size_t>(i * n + i)];
  mean_diag /= static_cast<double>(n);
  const double damp = opt.percdamp * mean_diag;
  // A = J·Hp·J (Hp = permuted, damped H; J reverses the order), then U = J·chol(A)⁻¹·J (see gptq.h).
  std::vector<double> A(static_cast<size_t>(n * n));
  for (int64_t a = 0; a < n; ++a) {
    const int64_t pa = ph.perm[static_cast<size_t>(n - 1 - a)];
    for (int64_t b = 0; b <= a; ++b) {
      const int64_t pb = ph.perm[static_cast<size_t>(n - 1 - b)];
      A[static_cast<size_t>(a * n + b)] = h[static_cast<size_t>(pa * n + pb)] + (a == b ? damp : 0.0);
    }
  }
  cholesky_lower(A, n);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a + 1; b < n; ++b) A[static_cast<size_t>(a * n + b)] = 0.0;
  std::vector<double> X = lower_inverse(A, n);
  ph.hinv.assign(static_cast<size_t>(n * n), 0.0f);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a; b < n; ++b)
      ph.hinv[static_cast<size_t>(a * n + b)] = static_cast<float>(X[static_cast<size_t>((n - 1 - a) * n + (n - 1 - b))]);
  return ph;
}

GroupPlan plan_groups(int64_t in, const WeightQuantSpec& spec, const GptqOptions& opt, const PreparedHessian& ph) {
  GroupPlan p;
  p.col_set.resize(static_cast<size_t>(in));
  if (spec.group_size <= 0) {
    p.len = in;
    p.nsets = 1;
    std::fill(p.col_set.begin(), p.col_set.end(), 0);
    return p;
  }
  p.len = spec.group_size;
  p.nsets = in / p.len;
  for (int64_t j = 0; j < in; ++j) {
    // Static groups belong to original columns; dynamic groups to permuted positions.
    const int64_t c = opt.static_groups ? ph.perm[static_cast<size_t>(j)] : j;
    p.col_set[static_cast<size_t>(j)] = static_cast<int32_t>(c / p.len);
  }
  return p;
}

}  // namespace gptq_detail

// ---------------------------------------------------------------------------------------------
// CPU backend

namespace cpu {

namespace {

// The quantizer of quant/gptq.h: integer levels, the scale divisor, and the range rule.
struct Rule {
  float qlo, qhi;  // clamp bounds of round(x/scale) + zp
  float div;       // scale = (range) / div
  bool sym, contain_zero;
};

Rule rule_of(const WeightQuantSpec& spec, const GptqOptions& opt) {
  Rule R;
  R.sym = spec.symmetric;
  R.contain_zero = opt.range_contains_zero;
  if (spec.symmetric) {
    R.qlo = -static_cast<float>(1 << (spec.bits - 1));
    R.qhi = static_cast<float>((1 << (spec.bits - 1)) - 1);
    // The original's symmetric scale is 2m/(2^N − 1) (zero point 2^(N−1) on levels 0..2^N−1 is the
    // signed range used here); fake_quant's is m/(2^(N−1) − 1).
    R.div = opt.range_contains_zero ? static_cast<float>((1 << spec.bits) - 1) : R.qhi;
  } else {
    R.qlo = 0.0f;
    R.qhi = static_cast<float>((1 << spec.bits) - 1);
    R.div = R.qhi;
  }
  return R;
}

// scale/zero of n contiguous values with clip factors a (max) and b (min); quant/gptq.h's formulas.
void group_params(const float* x, int64_t n, const Rule& R, float a, float b, float& scale, float& zp) {
  float xmax = x[0], xmin = x[0];
  for (int64_t i = 1; i < n; ++i) {
    xmax = std::max(xmax, x[i]);
    xmin = std::min(xmin, x[i]);
  }
  if (R.contain_zero) {  // the original GPTQ Quantizer.find_params
    xmax = std::max(xmax, 0.0f);
    xmin = std::min(xmin, 0.0f);
    float hi = a * xmax, lo = b * xmin;
    if (R.sym) {
      const float m = std::max(std::fabs(lo), std::fabs(hi));
      lo = -m;
      hi = m;
    }
    if (hi == 0.0f && lo == 0.0f) {
      lo = -1.0f;
      hi = 1.0f;
    }
    const float range = hi - lo;
    scale = range / R.div;
    zp = R.sym ? 0.0f : std::rint(-lo / scale);
    return;
  }
  // ops/cpu/fake_quant.cpp's group_state, step by step
  const float hi = a * xmax, lo = b * xmin;
  float raw;
  if (R.sym) {
    raw = std::max(std::fabs(hi), std::fabs(lo)) / R.div;
  } else {
    const float range = hi - lo;
    raw = range / R.div;
  }
  scale = std::min(std::max(raw, 1e-5f), 1e4f);
  if (R.sym) {
    zp = 0.0f;
  } else {
    const float z = -lo / scale;
    zp = std::rint(std::min(std::max(z, -1e4f), 1e4f));
  }
}

float quantize(float x, float scale, float zp, const Rule& R) {
  const float u = x / scale;
  const float t = std::rint(u);
  const float v = t + zp;
  const float q = std::min(std::max(v, R.qlo), R.qhi);
  return (q - zp) * scale;
}

// Parameters of sets k0..k1-1 (set k = columns [k·len, k·len+len)) of every row of W [out, in].
void params_for_sets(const std::vector<float>& W, int64_t out, int64_t in, int64_t len, int64_t k0, int64_t k1,
                     int64_t nsets, const Rule& R, const GptqClip* clip, std::vector<float>& scale,
                     std::vector<float>& zp) {
  for (int64_t r = 0; r < out; ++r)
    for (int64_t k = k0; k < k1; ++k) {
      const size_t s = static_cast<size_t>(r * nsets + k);
      const float a = clip ? clip->hi[s] : 1.0f, b = clip ? clip->lo[s] : 1.0f;
      group_params(&W[static_cast<size_t>(r * in + k * len)], len, R, a, b, scale[s], zp[s]);
    }
}

}  // namespace

Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt, const GptqClip* clip) {
  const int64_t out = w.size(0), in = w.size(1), bs = opt.block_size;
  const Rule L = rule_of(spec, opt);
  const gptq_detail::GroupPlan plan = gptq_detail::plan_groups(in, spec, opt, ph);
  const bool grouped = spec.group_size > 0;
  std::vector<float> scale(static_cast<size_t>(out * plan.nsets)), zp(scale.size());

  std::vector<float> W = w.to_f32_vector();
  if (!grouped) params_for_sets(W, out, in, in, 0, 1, 1, L, clip, scale, zp);              // step 1
  for (int64_t r = 0; r < out; ++r)                                                        // step 2
    for (int64_t i = 0; i < in; ++i)
      if (ph.dead[static_cast<size_t>(i)]) W[static_cast<size_t>(r * in + i)] = 0.0f;
  if (grouped && opt.static_groups)                                                        // step 3
    params_for_sets(W, out, in, plan.len, 0, plan.nsets, plan.nsets, L, clip, scale, zp);
  std::vector<float> Wp(W.size());                                                         // step 4
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j)
      Wp[static_cast<size_t>(r * in + j)] = W[static_cast<size_t>(r * in + ph.perm[static_cast<size_t>(j)])];

  const float* U = ph.hinv.data();
  std::vector<float> Q(W.size()), Err(static_cast<size_t>(out * bs));
  for (int64_t i1 = 0; i1 < in; i1 += bs) {                                                // step 6
    const int64_t i2 = std::min(i1 + bs, in), count = i2 - i1;
    if (grouped && !opt.static_groups) {
      const int64_t k0 = (i1 + plan.len - 1) / plan.len, k1 = (i2 + plan.len - 1) / plan.len;
      params_for_sets(Wp, out, in, plan.len, k0, k1, plan.nsets, L, clip, scale, zp);
    }
    for (int64_t r = 0; r < out; ++r) {
      float* wr = &Wp[static_cast<size_t>(r * in)];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t c = i1 + i;
        const size_t s = static_cast<size_t>(r * plan.nsets + plan.col_set[static_cast<size_t>(c)]);
        const float x = wr[c];
        const float q = quantize(x, scale[s], zp[s], L);
        Q[static_cast<size_t>(r * in + c)] = q;
        const float err = (x - q) / U[c * in + c];
        const float* urow = U + c * in;
        for (int64_t j = c + 1; j < i2; ++j) wr[j] -= err * urow[j];
        Err[static_cast<size_t>(r * bs + i)] = err;
      }
    }
    if (i2 < in)  // W[:, i2:] -= Err · U[i1:i2, i2:]
      gemm_f32(false, false, out, in - i2, count, -1.0f, Err.data(), bs, U + i1 * in + i2, in, 1.0f, Wp.data() + i2, in);
  }
  std::vector<float> res(W.size());
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j)
      res[static_cast<size_t>(r * in + ph.perm[static_cast<size_t>(j)])] = Q[static_cast<size_t>(r * in + j)];
  return Tensor::from_f32(res, w.shape(), DType::f32, w.device());
}

}  // namespace cpu

// ---------------------------------------------------------------------------------------------
// public API

namespace {
void check_linear_args(const Tensor& w, const WeightQuantSpec& spec, const GptqOptions& opt) {
  OMNIQ_CHECK(w.ndim() == 2 && w.dtype() == DType::f32, "gptq: the weight must be f32 [out, in], got %s",
              w.str().c_str());
  OMNIQ_CHECK(spec.enabled(), "gptq: bits = %d means 'not quantized'; GPTQ needs bits < 16", spec.bits);
  spec.validate(w.size(1), "gptq weight");
  OMNIQ_CHECK(opt.block_size > 0, "gptq: block_size must be > 0, got %lld", static_cast<long long>(opt.block_size));
}

void check_clip(const GptqClip& c, const Tensor& w, const WeightQuantSpec& spec, const GptqOptions& opt) {
  const int64_t groups = spec.num_groups(w.size(0), w.size(1));
  OMNIQ_CHECK(static_cast<int64_t>(c.hi.size()) == groups && static_cast<int64_t>(c.lo.size()) == groups,
              "gptq: clip factors have %zu (max) and %zu (min) entries but the weight %s has %lld quantization "
              "groups (group size %d)",
              c.hi.size(), c.lo.size(), w.str().c_str(), static_cast<long long>(groups), spec.group_size);
  OMNIQ_CHECK(!(opt.act_order && spec.group_size > 0 && !opt.static_groups),
              "gptq: clip factors belong to groups of original columns; with act_order and group size %d they "
              "need static_groups",
              spec.group_size);
  for (size_t k = 0; k < c.hi.size(); ++k)
    OMNIQ_CHECK(std::isfinite(c.hi[k]) && std::isfinite(c.lo[k]) && c.hi[k] > 0 && c.lo[k] > 0,
                "gptq: clip factors must be finite and > 0 (σ of LWC's γ/β), group %zu has %g / %g", k,
                static_cast<double>(c.hi[k]), static_cast<double>(c.lo[k]));
}

Tensor quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                         const GptqOptions& opt, const GptqClip* clip) {
  OMNIQ_CHECK(ph.n == w.size(1), "gptq: H is %lld×%lld but the weight %s has %lld input features",
              static_cast<long long>(ph.n), static_cast<long long>(ph.n), w.str().c_str(),
              static_cast<long long>(w.size(1)));
  if (clip && clip->empty()) clip = nullptr;
  if (clip) check_clip(*clip, w, spec, opt);
  if (w.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::gptq_quantize_prepared(w, ph, spec, opt, clip);
#else
    OMNIQ_FAIL("gptq: %s is on CUDA but this build has no CUDA support", w.str().c_str());
#endif
  }
  return cpu::gptq_quantize_prepared(w, ph, spec, opt, clip);
}
}  // namespace

GptqClip gptq_clip_from_factors(const Tensor& hi, const Tensor& lo) {
  OMNIQ_CHECK(hi.dtype() == DType::f32 && lo.dtype() == DType::f32 && hi.numel() == lo.numel(),
              "gptq_clip_from_factors: expected two f32 tensors of equal size, got %s and %s", hi.str().c_str(),
              lo.str().c_str());
  GptqClip c;
  c.hi = hi.to_f32_vector();
  c.lo = lo.to_f32_vector();
  return c;
}

GptqClip gptq_clip_from_lwc(const Tensor& gamma, const Tensor& beta) {
  GptqClip c = gptq_clip_from_factors(gamma, beta);
  // σ in fp64 rounded once to fp32, as ops/cpu/fake_quant.cpp (so the clipped range is LWC's bit for bit)
  auto sigmoid = [](float g) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(g)))); };
  for (float& v : c.hi) v = sigmoid(v);
  for (float& v : c.lo) v = sigmoid(v);
  return c;
}

Tensor gptq_quantize_linear(const Tensor& w, const Tensor& H, const WeightQuantSpec& spec, const GptqOptions& opt,
                            const GptqClip* clip) {
  check_linear_args(w, spec, opt);
  check_same_device(w, H, "gptq_quantize_linear");
  return quantize_prepared(w, gptq_detail::prepare_hessian(H, opt), spec, opt, clip);
}

void gptq_accumulate_hessian(Tensor& H, int64_t& count, const Tensor& x) {
  check_float(x, "gptq_accumulate_hessian", "x");
  const int64_t in = x.cols(), n = x.rows();
  if (!H.defined()) H = Tensor::zeros({in, in}, DType::f32, x.device());
  check_shape(H, {in, in}, "gptq_accumulate_hessian", "H");
  check_dtype(H, DType::f32, "gptq_accumulate_hessian", "H");
  check_same_device(H, x, "gptq_accumulate_hessian");
  if (n == 0) return;
  const double total = static_cast<double>(count + n);
  const float beta = static_cast<float>(static_cast<double>(count) / total);
  const float alpha = static_cast<float>(2.0 / total);
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::gptq_accumulate_hessian(H, x, alpha, beta);
#else
    OMNIQ_FAIL("gptq_accumulate_hessian: %s is on CUDA but this build has no CUDA support", x.str().c_str());
#endif
  } else {
    std::vector<float> xf = x.to_f32_vector();
    // H[in, in] = alpha · Xᵀ X + beta · H  (X row-major [n, in]: op(A) = Xᵀ)
    cpu::gemm_f32(true, false, in, in, n, alpha, xf.data(), in, xf.data(), in, beta, H.data_as<float>(), in);
  }
  count += n;
}

std::vector<std::vector<std::string>> gptq_site_groups(const ModelConfig& cfg) {
  if (cfg.is_opt()) return {{"q_proj", "k_proj", "v_proj"}, {"out_proj"}, {"fc1"}, {"fc2"}};
  return {{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}};
}

namespace {
// Accumulates the Hessian of one site's input while the block runs.
struct HessianCapture : BlockHooks {
  std::string site;
  Tensor H;
  int64_t count = 0;
  ag::Var activation(ag::Tape&, const std::string& s, const ag::Var& x) override {
    if (s == site) gptq_accumulate_hessian(H, count, x->value);
    return x;
  }
};
}  // namespace

void gptq_quantize_block(const ModelConfig& cfg, BlockWeights& weights, const Tensor& inps, const WeightQuantSpec& spec,
                         const GptqOptions& opt) {
  OMNIQ_CHECK(inps.ndim() == 3 && inps.size(2) == cfg.hidden_size, "gptq_quantize_block: inps must be [N, T, %lld], got %s",
              static_cast<long long>(cfg.hidden_size), inps.str().c_str());
  std::vector<std::string> sites = block_linear_sites(cfg);
  for (const auto& [site, c] : opt.clip)
    OMNIQ_CHECK(std::find(sites.begin(), sites.end(), site) != sites.end(),
                "gptq_quantize_block: clip factors given for '%s', which is no Linear site of this block", site.c_str());
  auto is_linear_param = [&](const std::string& key) {
    for (const std::string& s : sites)
      if (key == s + ".weight" || key == s + ".bias") return true;
    return false;
  };
  for (const auto& group : gptq_site_groups(cfg)) {
    for (const std::string& s : group) check_linear_args(weights.get(s + ".weight"), spec, opt);
    // The block as it is now (earlier groups quantized), Linear parameters in the inputs' dtype.
    BlockWeights fwd;
    fwd.what = weights.what;
    for (const auto& [key, t] : weights.tensors)
      fwd.tensors.emplace(key, is_linear_param(key) && t.dtype() != inps.dtype() ? t.to(inps.dtype()) : t.alias());
    auto params = block_params(fwd);
    HessianCapture cap;
    cap.site = group.front();  // the group's Linears share this input
    for (int64_t j = 0; j < inps.size(0); ++j) {
      ag::Tape t;
      decoder_block_forward(t, cfg, params, ag::constant(inps.view_rows(j, 1)), &cap);
    }
    OMNIQ_CHECK(cap.H.defined(), "gptq_quantize_block: site %s never saw an input", cap.site.c_str());
    gptq_detail::PreparedHessian ph = gptq_detail::prepare_hessian(cap.H, opt);
    for (const std::string& s : group) {
      Tensor& w = weights.get(s + ".weight");
      auto c = opt.clip.find(s);
      Tensor q = quantize_prepared(w, ph, spec, opt, c == opt.clip.end() ? nullptr : &c->second);
      w.copy_from(q);
    }
  }
}

}  // namespace omniq
