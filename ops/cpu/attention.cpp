// CPU reference of attention and the causal softmax: plain loops, fp32 inputs (bf16/f16 widened),
// sums accumulated in double so the reference is more accurate than the kernels it checks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu/gemm.h"

namespace omniq::cpu {

namespace {

const float* host_f32(const Tensor& t, Tensor& holder) {
  if (t.dtype() == DType::f32) return t.data_as<float>();
  holder = t.to(DType::f32);
  return holder.data_as<float>();
}

Tensor from_values(const std::vector<double>& v, const Shape& s, DType dt) {
  std::vector<float> f(v.begin(), v.end());
  return Tensor::from_f32(f, s, dt);
}

double dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Sizes of one attention problem; offsets into the [B, T, H, D] layouts.
struct Dims {
  int64_t B, T, Hq, Hkv, D, G;
  Dims(const Tensor& q, const Tensor& k)
      : B(q.size(0)), T(q.size(1)), Hq(q.size(2)), Hkv(k.size(2)), D(q.size(3)), G(q.size(2) / k.size(2)) {}
  int64_t qo(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * Hq + h) * D; }
  int64_t ko(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * Hkv + h) * D; }
};

}  // namespace

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out) {
  // Per (batch, head): S = scale·Q·Kᵀ and O = P·V through the BLAS GEMM (the model's CPU forward
  // spends most of its time here), the softmax in between with double sums.
  const Dims d(q, k);
  Tensor qh, kh, vh;
  const float* Q = host_f32(q, qh);
  const float* K = host_f32(k, kh);
  const float* V = host_f32(v, vh);
  Tensor out = Tensor::empty(q.shape(), DType::f32);
  float* O = out.data_as<float>();
  std::vector<float> lse(static_cast<size_t>(d.B * d.Hq * d.T));
  std::vector<float> S(static_cast<size_t>(d.T * d.T));
  const int64_t ldq = d.Hq * d.D, ldk = d.Hkv * d.D;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t kvh = h / d.G;  // repeat_kv: query heads [kvh*G, (kvh+1)*G) share kv head kvh
      gemm_f32(false, true, d.T, d.T, d.D, scale, Q + d.qo(b, 0, h), ldq, K + d.ko(b, 0, kvh), ldk, 0.0f, S.data(), d.T);
      for (int64_t i = 0; i < d.T; ++i) {
        float* row = S.data() + i * d.T;
        const int64_t jend = causal ? i + 1 : d.T;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < jend; ++j) m = std::max(m, row[j]);
        double l = 0;
        for (int64_t j = 0; j < jend; ++j) {
          row[j] = std::exp(row[j] - m);
          l += row[j];
        }
        const float inv = static_cast<float>(1.0 / l);
        for (int64_t j = 0; j < jend; ++j) row[j] *= inv;
        for (int64_t j = jend; j < d.T; ++j) row[j] = 0.0f;
        lse[static_cast<size_t>((b * d.Hq + h) * d.T + i)] = static_cast<float>(m + std::log(l));
      }
      gemm_f32(false, false, d.T, d.D, d.T, 1.0f, S.data(), d.T, V + d.ko(b, 0, kvh), ldk, 0.0f, O + d.qo(b, 0, h), ldq);
    }
  if (lse_out) *lse_out = Tensor::from_f32(lse, Shape{d.B, d.Hq, d.T}, DType::f32);
  return q.dtype() == DType::f32 ? std::move(out) : out.to(q.dtype());
}

AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal) {
  const Dims d(q, k);
  Tensor qh, kh, vh, doh, oh;
  const float* Q = host_f32(q, qh);
  const float* K = host_f32(k, kh);
  const float* V = host_f32(v, vh);
  const float* dO = host_f32(dout, doh);
  const float* O = host_f32(out, oh);
  const float* L = lse.data_as<float>();
  std::vector<double> dq(static_cast<size_t>(q.numel()), 0.0);
  std::vector<double> dk(static_cast<size_t>(k.numel()), 0.0);
  std::vector<double> dv(static_cast<size_t>(k.numel()), 0.0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t kvh = h / d.G;
      for (int64_t i = 0; i < d.T; ++i) {
        const float* qi = Q + d.qo(b, i, h);
        const float* doi = dO + d.qo(b, i, h);
        const double lse_i = L[(b * d.Hq + h) * d.T + i];
        // Σ_j P_ij dP_ij = dO_i · O_i (the softmax Jacobian's row term, from the saved output).
        const double delta = dot(doi, O + d.qo(b, i, h), d.D);
        double* dqi = dq.data() + d.qo(b, i, h);
        const int64_t jend = causal ? i + 1 : d.T;
        for (int64_t j = 0; j < jend; ++j) {
          const float* kj = K + d.ko(b, j, kvh);
          const float* vj = V + d.ko(b, j, kvh);
          const double p = std::exp(scale * dot(qi, kj, d.D) - lse_i);
          const double ds = p * (dot(doi, vj, d.D) - delta);  // dS = P ⊙ (dP − delta)
          double* dkj = dk.data() + d.ko(b, j, kvh);
          double* dvj = dv.data() + d.ko(b, j, kvh);
          for (int64_t e = 0; e < d.D; ++e) {
            dqi[e] += scale * ds * kj[e];
            dkj[e] += scale * ds * qi[e];
            dvj[e] += p * doi[e];
          }
        }
      }
    }
  AttentionGrads g;
  g.dq = from_values(dq, q.shape(), q.dtype());
  g.dk = from_values(dk, k.shape(), q.dtype());
  g.dv = from_values(dv, k.shape(), q.dtype());
  return g;
}

Tensor causal_softmax_forward(const Tensor& scores, float scale) {
  const int64_t T = scores.size(-1), rows = scores.numel() / T;
  Tensor sh;
  const float* S = host_f32(scores, sh);
  std::vector<double> p(static_cast<size_t>(scores.numel()), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % T;  // query position within its [T, T] matrix
    const float* s = S + r * T;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j <= i; ++j) m = std::max(m, static_cast<double>(scale) * s[j]);
    double l = 0;
    for (int64_t j = 0; j <= i; ++j) l += std::exp(static_cast<double>(scale) * s[j] - m);
    for (int64_t j = 0; j <= i; ++j) p[r * T + j] = std::exp(static_cast<double>(scale) * s[j] - m) / l;
  }
  return from_values(p, scores.shape(), scores.dtype());
}

Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale) {
  const int64_t T = probs.size(-1), rows = probs.numel() / T;
  Tensor dph, ph;
  const float* dP = host_f32(dprobs, dph);
  const float* P = host_f32(probs, ph);
  std::vector<double> ds(static_cast<size_t>(probs.numel()), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % T;
    const float* p = P + r * T;
    const float* dp = dP + r * T;
    double sum = 0;
    for (int64_t j = 0; j <= i; ++j) sum += static_cast<double>(p[j]) * dp[j];
    for (int64_t j = 0; j <= i; ++j) ds[r * T + j] = scale * p[j] * (dp[j] - sum);
  }
  return from_values(ds, probs.shape(), probs.dtype());
}

}  // namespace omniq::cpu
