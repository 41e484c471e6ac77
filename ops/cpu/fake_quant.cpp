// CPU reference of the fake quantizers (the specification the CUDA kernels are tested against).
// Formulas and gradient rules: ops/fake_quant.h.
//
// Each quantity is one IEEE fp32 operation, in the order of the reference code, so that the CUDA
// kernels (which use the explicitly rounded __fdiv_rn/__fmul_rn/... intrinsics) reproduce x̂ bit for
// bit. GCC contracts a·b + c into an FMA across statements when the target has FMA
// (-ffp-contract=fast is its default outside ISO mode), which would change xmax' − xmin' by an ulp
// and flip rounding decisions: contraction is switched off for this file. The group reduction of the
// scale gradient is accumulated in double (this reference is the more accurate side).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <cmath>
#include <vector>

#include "ops/fake_quant.h"
#include "runtime/error.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace omniq::cpu {

namespace {

// What a tensor of dtype dt would store for v (identity for f32).
float round_to(DType dt, float v) {
  switch (dt) {
    case DType::bf16: return round_bf16(v);
    case DType::f16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}

// Writes fp32 host values into t, converting to t's dtype (round to nearest even).
void store(Tensor& t, const std::vector<float>& v) { t.copy_from(Tensor::from_f32(v, t.shape())); }

// σ(g) in fp64, rounded once to fp32: both backends get the same bits (see ops/fake_quant.h).
float sigmoid(float g) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(g)))); }

// The integer range of the quantized values and the divisor of the scale.
struct Levels {
  float qlo, qhi;  // clamp bounds of round(x/scale) + zp
  float qdiv;      // asymmetric: 2^N − 1; symmetric: 2^(N−1) − 1
};

Levels levels(const GroupQuantParams& p) {
  Levels l;
  if (p.symmetric) {
    l.qlo = -static_cast<float>(1 << (p.bits - 1));
    l.qhi = static_cast<float>((1 << (p.bits - 1)) - 1);
  } else {
    l.qlo = 0.0f;
    l.qhi = static_cast<float>((1 << p.bits) - 1);
  }
  l.qdiv = l.qhi;
  return l;
}

// Everything the forward computes once per group (the backward needs it all again).
struct GroupState {
  float xmax, xmin;   // raw group max / min
  float a, b;         // σ(γ), σ(β); 1 without LWC
  float hi, lo;       // clipped range xmax' = a·xmax, xmin' = b·xmin
  float scale_raw;    // before the [1e-5, 1e4] clamp (its gradient mask)
  float scale, zp;
};

GroupState group_state(const float* x, int64_t n, const Levels& L, bool symmetric, const float* gamma,
                       const float* beta, int64_t k) {
  GroupState s;
  s.xmax = x[0];
  s.xmin = x[0];
  for (int64_t i = 1; i < n; ++i) {
    s.xmax = std::max(s.xmax, x[i]);
    s.xmin = std::min(s.xmin, x[i]);
  }
  s.a = gamma ? sigmoid(gamma[k]) : 1.0f;
  s.b = beta ? sigmoid(beta[k]) : 1.0f;
  s.hi = s.a * s.xmax;
  s.lo = s.b * s.xmin;
  if (symmetric) {
    s.scale_raw = std::max(std::fabs(s.hi), std::fabs(s.lo)) / L.qdiv;
  } else {
    const float range = s.hi - s.lo;
    s.scale_raw = range / L.qdiv;
  }
  s.scale = std::min(std::max(s.scale_raw, 1e-5f), 1e4f);
  if (symmetric) {
    s.zp = 0.0f;
  } else {
    const float z = -s.lo / s.scale;
    s.zp = std::rint(std::min(std::max(z, -1e4f), 1e4f));  // rint: half to even, like torch.round
  }
  return s;
}

// One element through the quantizer: u = x/scale, t = round(u), q = clamp(t + zp); returns x̂.
struct ElemQ {
  float u, t, q;
  bool in;  // round(x/scale) + zp inside [qlo, qhi] (bounds inclusive): the STE passes the gradient
};

ElemQ quantize(float x, const GroupState& s, const Levels& L) {
  ElemQ e;
  e.u = x / s.scale;
  e.t = std::rint(e.u);
  const float v = e.t + s.zp;
  e.in = v >= L.qlo && v <= L.qhi;
  e.q = std::min(std::max(v, L.qlo), L.qhi);
  return e;
}

float dequantize(const ElemQ& e, const GroupState& s) { return (e.q - s.zp) * s.scale; }

int sign_or_zero(float v) { return (v > 0.0f) - (v < 0.0f); }  // torch.sgn: abs() backward

// Gradients of one group from dscale = Σ dy·∂x̂/∂scale (chain rule in ops/fake_quant.h).
struct GroupGrad {
  float dgamma, dbeta;  // only meaningful with LWC
  float dxmax, dxmin;   // to be shared among the argmax / argmin elements
};

GroupGrad group_grad(const GroupState& s, float dscale, const Levels& L, bool symmetric, bool lwc) {
  const float ds = (s.scale_raw >= 1e-5f && s.scale_raw <= 1e4f) ? dscale : 0.0f;  // clamp passes inside
  float dhi, dlo;
  if (symmetric) {
    const float dabs = ds / L.qdiv;  // d max(|hi|, |lo|)
    const float ah = std::fabs(s.hi), al = std::fabs(s.lo);
    const float share_hi = ah > al ? 1.0f : (ah < al ? 0.0f : 0.5f);  // torch.maximum splits ties
    dhi = dabs * share_hi * static_cast<float>(sign_or_zero(s.hi));
    dlo = dabs * (1.0f - share_hi) * static_cast<float>(sign_or_zero(s.lo));
  } else {
    dhi = ds / L.qdiv;
    dlo = -dhi;
  }
  GroupGrad g{0.0f, 0.0f, dhi, dlo};
  if (lwc) {
    g.dgamma = (dhi * s.xmax) * ((1.0f - s.a) * s.a);  // σ' = σ(1 − σ)
    g.dbeta = (dlo * s.xmin) * ((1.0f - s.b) * s.b);
    g.dxmax = dhi * s.a;
    g.dxmin = dlo * s.b;
  }
  return g;
}

}  // namespace

void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y) {
  const int64_t n = p.group, groups = x.numel() / n;
  const DType dt = y.dtype();  // may differ from x's: the fp32 x̂ is rounded once, to y's dtype
  const Levels L = levels(p);
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  const std::vector<float> xv = x.to_f32_vector();
  std::vector<float> yv(xv.size());
  for (int64_t k = 0; k < groups; ++k) {
    const float* xg = &xv[k * n];
    const GroupState s = group_state(xg, n, L, p.symmetric, gp, bp, k);
    for (int64_t i = 0; i < n; ++i) yv[k * n + i] = round_to(dt, dequantize(quantize(xg[i], s, L), s));
  }
  store(y, yv);
}

void fake_quant_groups_backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma,
                                const Tensor* beta, Tensor* dx, Tensor* dgamma, Tensor* dbeta) {
  const int64_t n = p.group, groups = x.numel() / n;
  const Levels L = levels(p);
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  float* dgp = dgamma ? dgamma->data_as<float>() : nullptr;
  float* dbp = dbeta ? dbeta->data_as<float>() : nullptr;
  const std::vector<float> xv = x.to_f32_vector(), dyv = dy.to_f32_vector();  // dy: any float dtype
  std::vector<float> dxv(dx ? xv.size() : 0);
  for (int64_t k = 0; k < groups; ++k) {
    const float* xg = &xv[k * n];
    const float* gg = &dyv[k * n];
    const GroupState s = group_state(xg, n, L, p.symmetric, gp, bp, k);
    // dscale = Σ dy·∂x̂/∂scale; ∂x̂/∂scale = round(u) − u inside the clamp, the clamped level outside.
    double dscale = 0.0;
    int64_t n_max = 0, n_min = 0;
    for (int64_t i = 0; i < n; ++i) {
      const ElemQ e = quantize(xg[i], s, L);
      const float dxhat_dscale = e.in ? e.t - e.u : e.q - s.zp;
      dscale += static_cast<double>(gg[i]) * dxhat_dscale;
      n_max += xg[i] == s.xmax;
      n_min += xg[i] == s.xmin;
    }
    const GroupGrad g = group_grad(s, static_cast<float>(dscale), L, p.symmetric, gp != nullptr);
    if (dgp) dgp[k] = g.dgamma;
    if (dbp) dbp[k] = g.dbeta;
    if (!dx) continue;
    // amax/amin backward: the group's max (min) gradient is shared evenly among tied elements.
    const float share_max = g.dxmax / static_cast<float>(n_max);
    const float share_min = g.dxmin / static_cast<float>(n_min);
    for (int64_t i = 0; i < n; ++i) {
      const ElemQ e = quantize(xg[i], s, L);
      float d = e.in ? gg[i] : 0.0f;  // STE through round(x/scale), masked by the clamp
      d += xg[i] == s.xmax ? share_max : 0.0f;
      d += xg[i] == s.xmin ? share_min : 0.0f;
      dxv[k * n + i] = d;
    }
  }
  if (dx) store(*dx, dxv);
}

void abs_floor_ste(const Tensor& s, float floor, Tensor& y) {
  std::vector<float> v = s.to_f32_vector();
  for (float& e : v) {
    if (std::fabs(e) < floor) e = e < 0.0f ? -floor : floor;  // sign(0) = +1
  }
  store(y, v);
}

}  // namespace omniq::cpu
