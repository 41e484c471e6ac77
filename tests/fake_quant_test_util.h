// Test-only oracle for the fake quantizers: a scalar fp32 forward written line by line from the
// reference code's UniformAffineQuantizer (independent of ops/cpu/fake_quant.cpp), a double
// chain-rule backward that reuses only the forward's rounding/clamp decisions, test data with the
// awkward groups (constant, all-positive, all-negative, ties, zeros), and exact-comparison helpers.
// Include after `#pragma GCC optimize("fp-contract=off")` so the fp32 oracle rounds like the op.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <vector>

#include "runtime/tensor.h"

namespace omniq::test {

struct QuantCfg {
  int64_t n;  // group length
  int bits;
  bool symmetric = false;
};

// What the fp32 forward decided, per group and per element (the backward oracles freeze these).
struct RefQuant {
  std::vector<float> y;                                    // x̂
  std::vector<float> xmax, xmin, a, b, hi, lo, scale_raw, scale, zp;  // per group
  std::vector<float> t, q;                                 // round(x/scale), clamped level
  std::vector<char> in;                                    // STE passes (clamp not active)
  int64_t clamped = 0;                                     // elements outside the level range
};

inline float sigmoid_ref(float g) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(g)))); }

// x̂ by the reference formulas (ops/fake_quant.h), one fp32 operation per step.
inline RefQuant ref_forward(const std::vector<float>& x, const QuantCfg& c, const std::vector<float>* gamma,
                            const std::vector<float>* beta) {
  const int64_t groups = static_cast<int64_t>(x.size()) / c.n;
  const float qlo = c.symmetric ? -std::ldexp(1.0f, c.bits - 1) : 0.0f;
  const float qhi = c.symmetric ? std::ldexp(1.0f, c.bits - 1) - 1.0f : std::ldexp(1.0f, c.bits) - 1.0f;
  RefQuant r;
  r.y.resize(x.size());
  r.t.resize(x.size());
  r.q.resize(x.size());
  r.in.resize(x.size());
  for (int64_t k = 0; k < groups; ++k) {
    const float* xg = &x[k * c.n];
    const float xmax = *std::max_element(xg, xg + c.n), xmin = *std::min_element(xg, xg + c.n);
    const float a = gamma ? sigmoid_ref((*gamma)[k]) : 1.0f, b = beta ? sigmoid_ref((*beta)[k]) : 1.0f;
    const float hi = a * xmax, lo = b * xmin;
    const float scale_raw = c.symmetric ? std::max(std::fabs(hi), std::fabs(lo)) / qhi : (hi - lo) / qhi;
    const float scale = std::min(std::max(scale_raw, 1e-5f), 1e4f);
    const float zp = c.symmetric ? 0.0f : std::nearbyint(std::min(std::max(-lo / scale, -1e4f), 1e4f));
    for (auto* v : {&r.xmax, &r.xmin, &r.a, &r.b, &r.hi, &r.lo, &r.scale_raw, &r.scale, &r.zp}) v->push_back(0);
    r.xmax[k] = xmax, r.xmin[k] = xmin, r.a[k] = a, r.b[k] = b, r.hi[k] = hi, r.lo[k] = lo;
    r.scale_raw[k] = scale_raw, r.scale[k] = scale, r.zp[k] = zp;
    for (int64_t i = k * c.n; i < (k + 1) * c.n; ++i) {
      const float t = std::nearbyint(x[i] / scale);  // half to even (default rounding mode)
      const float v = t + zp;
      r.t[i] = t;
      r.in[i] = v >= qlo && v <= qhi;
      r.clamped += !r.in[i];
      r.q[i] = std::min(std::max(v, qlo), qhi);
      r.y[i] = (r.q[i] - zp) * scale;
    }
  }
  return r;
}

struct RefGrads {
  std::vector<double> dx, dgamma, dbeta;
};

// Chain rule in double (ops/fake_quant.h), reusing only the forward's decisions (t, in, q, zp and
// which elements are the max/min). Independent of the op's code.
inline RefGrads ref_backward(const std::vector<float>& x, const std::vector<float>& dy, const QuantCfg& c,
                             const RefQuant& f, bool lwc) {
  const int64_t groups = static_cast<int64_t>(x.size()) / c.n;
  const double qdiv = c.symmetric ? std::ldexp(1.0, c.bits - 1) - 1.0 : std::ldexp(1.0, c.bits) - 1.0;
  RefGrads g;
  g.dx.assign(x.size(), 0.0);
  g.dgamma.assign(groups, 0.0);
  g.dbeta.assign(groups, 0.0);
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t i0 = k * c.n, i1 = i0 + c.n;
    double dscale = 0;
    int nmax = 0, nmin = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const double u = static_cast<double>(x[i]) / f.scale[k];
      dscale += dy[i] * (f.in[i] ? f.t[i] - u : static_cast<double>(f.q[i]) - f.zp[k]);
      nmax += x[i] == f.xmax[k];
      nmin += x[i] == f.xmin[k];
    }
    if (!(f.scale_raw[k] >= 1e-5f && f.scale_raw[k] <= 1e4f)) dscale = 0;
    double dhi, dlo;
    if (c.symmetric) {
      const double ah = std::fabs(f.hi[k]), al = std::fabs(f.lo[k]);
      const double wh = ah > al ? 1.0 : (ah < al ? 0.0 : 0.5);
      auto sgn = [](double v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : 0.0); };
      dhi = dscale / qdiv * wh * sgn(f.hi[k]);
      dlo = dscale / qdiv * (1 - wh) * sgn(f.lo[k]);
    } else {
      dhi = dscale / qdiv;
      dlo = -dscale / qdiv;
    }
    double dxmax = dhi, dxmin = dlo;
    if (lwc) {
      const double a = f.a[k], b = f.b[k];
      g.dgamma[k] = dhi * f.xmax[k] * a * (1 - a);
      g.dbeta[k] = dlo * f.xmin[k] * b * (1 - b);
      dxmax = dhi * a;
      dxmin = dlo * b;
    }
    for (int64_t i = i0; i < i1; ++i) {
      g.dx[i] = (f.in[i] ? dy[i] : 0.0) + (x[i] == f.xmax[k] ? dxmax / nmax : 0.0) +
                (x[i] == f.xmin[k] ? dxmin / nmin : 0.0);
    }
  }
  return g;
}

// Σ dy·x̂ of the STE-defined function, in double, with the forward's rounding offsets t − x/s,
// clamp decisions and zero points frozen: a smooth function of (x, γ, β) whose exact derivative is
// what the backward must return, so finite differences of it test the backward (the real forward
// is piecewise constant). `f` comes from ref_forward at the unperturbed point; the max/min are
// recomputed, so perturbing an extreme element moves the scale (keep extremes untied).
inline double ste_surrogate(const std::vector<float>& x, const std::vector<float>& dy, const QuantCfg& c,
                            const RefQuant& f, const std::vector<double>& frozen_offset, const float* gamma,
                            const float* beta) {
  const int64_t groups = static_cast<int64_t>(x.size()) / c.n;
  const double qdiv = c.symmetric ? std::ldexp(1.0, c.bits - 1) - 1.0 : std::ldexp(1.0, c.bits) - 1.0;
  double loss = 0;
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t i0 = k * c.n, i1 = i0 + c.n;
    const double xmax = *std::max_element(&x[i0], &x[i0] + c.n), xmin = *std::min_element(&x[i0], &x[i0] + c.n);
    const double a = gamma ? 1.0 / (1.0 + std::exp(-static_cast<double>(gamma[k]))) : 1.0;
    const double b = beta ? 1.0 / (1.0 + std::exp(-static_cast<double>(beta[k]))) : 1.0;
    const double hi = a * xmax, lo = b * xmin;
    double s = c.symmetric ? std::max(std::fabs(hi), std::fabs(lo)) / qdiv : (hi - lo) / qdiv;
    if (!(f.scale_raw[k] >= 1e-5f && f.scale_raw[k] <= 1e4f)) s = f.scale[k];  // clamp active: constant
    for (int64_t i = i0; i < i1; ++i) {
      const double xhat = f.in[i] ? (x[i] / s + frozen_offset[i]) * s : (f.q[i] - static_cast<double>(f.zp[k])) * s;
      loss += dy[i] * xhat;
    }
  }
  return loss;
}

// round(x/s) − x/s at the unperturbed point (double), the frozen STE offsets of ste_surrogate.
inline std::vector<double> frozen_offsets(const std::vector<float>& x, const QuantCfg& c, const RefQuant& f) {
  std::vector<double> o(x.size());
  for (size_t i = 0; i < x.size(); ++i) o[i] = f.t[i] - static_cast<double>(x[i]) / f.scale[i / c.n];
  return o;
}

// Random values in [-1, 1) with awkward groups planted at the start (group k = elements
// [k·n, (k+1)·n)): 0 constant 0.7 (scale clamp), 1 all positive (zp < 0), 2 all negative,
// 3 tied max and min, 4 all zeros. With plant = false only groups 1 and 2 are planted (smooth
// data for finite differences).
inline std::vector<float> make_groups(int64_t groups, int64_t n, uint64_t seed, bool plant = true) {
  std::vector<float> v = Tensor::uniform({groups * n}, -1.0f, 1.0f, seed).to_f32_vector();
  auto grp = [&](int64_t k) { return v.begin() + k * n; };
  if (groups > 2) {
    std::for_each(grp(1), grp(2), [](float& e) { e = std::fabs(e) + 0.5f; });
    std::for_each(grp(2), grp(3), [](float& e) { e = -std::fabs(e) - 0.25f; });
  }
  if (plant && groups > 4 && n >= 4) {
    std::fill(grp(0), grp(1), 0.7f);
    float* g3 = &v[3 * n];
    g3[0] = g3[n - 1] = 1.5f;  // two maxima
    g3[1] = g3[n - 2] = -1.5f;  // two minima
    std::fill(grp(4), grp(5), 0.0f);
  }
  return v;
}

// Exact (==) elementwise comparison with the first few mismatches in the message.
inline ::testing::AssertionResult bit_equal(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << "size " << got.size() << " vs " << ref.size();
  int64_t bad = 0;
  std::ostringstream msg;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == ref[i] || (std::isnan(got[i]) && std::isnan(ref[i]))) continue;
    if (bad++ < 5) msg << "\n  [" << i << "] got " << got[i] << " want " << ref[i];
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ" << msg.str();
}

inline std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

inline float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float e : v) m = std::max(m, std::fabs(e));
  return m;
}

}  // namespace omniq::test
