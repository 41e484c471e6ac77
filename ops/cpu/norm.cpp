// CPU reference of RMSNorm / LayerNorm (the specification the CUDA kernels are tested against).
//
// Inputs of any float dtype are widened to fp32; per-row statistics and the column sums of dw/db
// are accumulated in double so that this reference is the more accurate side of every comparison;
// stored statistics are fp32. Outputs are rounded once to x's dtype (plus RMSNorm's documented
// rounding of x̂, see ops/norm.h).
#include <cmath>
#include <vector>

#include "ops/norm.h"
#include "runtime/error.h"

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

// dx's final value: the new fp32 dx, plus (accumulate) the fp32 value dx holds, rounded once by store.
void store_dx(Tensor& dx, std::vector<float>& v, bool accumulate) {
  if (accumulate) {
    const std::vector<float> old = dx.to_f32_vector();
    for (size_t i = 0; i < v.size(); ++i) v[i] = old[i] + v[i];
  }
  store(dx, v);
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const int64_t R = x.rows(), C = x.cols();
  const DType dt = x.dtype();
  const std::vector<float> xv = x.to_f32_vector();
  const float* wp = w.data_as<const float>();
  std::vector<float> yv(xv.size());
  float* rs_out = rstd.data_as<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &xv[r * C];
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float var = static_cast<float>(ss / C);
    const float rs = 1.0f / std::sqrt(var + eps);
    rs_out[r] = rs;
    // HF LlamaRMSNorm: weight * (x * rstd).to(input_dtype) -- x̂ is rounded before the multiply.
    for (int64_t c = 0; c < C; ++c) yv[r * C + c] = wp[c] * round_to(dt, xr[c] * rs);
  }
  store(y, yv);
}

// y_c = w_c · x_c · r with r = (mean(x²) + eps)^(-1/2), so ∂r/∂x_j = −r³ x_j / C and
//   dx_j = r · (g_j − x̂_j · mean_c(g_c · x̂_c)),   g = dy · w,  x̂ = x · r.
// An undefined dx or dw is not computed (see ops/norm.h).
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                      bool accumulate_dx) {
  const int64_t R = x.rows(), C = x.cols();
  const DType dt = x.dtype();
  const bool need_dx = dx.defined(), need_dw = dw.defined();
  const std::vector<float> xv = x.to_f32_vector(), dyv = dy.to_f32_vector();
  const float* wp = w.data_as<const float>();
  const float* rsp = rstd.data_as<const float>();
  std::vector<float> dxv(need_dx ? xv.size() : 0);
  std::vector<double> dw_acc(need_dw ? C : 0, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &xv[r * C];
    const float* gr = &dyv[r * C];
    const float rs = rsp[r];
    if (need_dx) {
      double dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(gr[c] * wp[c]) * (xr[c] * rs);
      const float mean_dot = static_cast<float>(dot / C);
      for (int64_t c = 0; c < C; ++c) dxv[r * C + c] = rs * (gr[c] * wp[c] - (xr[c] * rs) * mean_dot);
    }
    // dw uses x̂ as the forward multiplied it: rounded to x's dtype.
    if (need_dw)
      for (int64_t c = 0; c < C; ++c) dw_acc[c] += static_cast<double>(gr[c]) * round_to(dt, xr[c] * rs);
  }
  if (need_dx) store_dx(dx, dxv, accumulate_dx);
  if (need_dw) {
    float* dwp = dw.data_as<float>();
    for (int64_t c = 0; c < C; ++c) dwp[c] = static_cast<float>(dw_acc[c]);
  }
}

void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y, Tensor& mean,
                       Tensor& rstd) {
  const int64_t R = x.rows(), C = x.cols();
  const std::vector<float> xv = x.to_f32_vector();
  const float* wp = w.data_as<const float>();
  const float* bp = b.data_as<const float>();
  float* mean_out = mean.data_as<float>();
  float* rs_out = rstd.data_as<float>();
  std::vector<float> yv(xv.size());
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &xv[r * C];
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const double mu = s / C;
    double ss = 0;  // two-pass variance: no cancellation for rows with a large mean
    for (int64_t c = 0; c < C; ++c) ss += (xr[c] - mu) * (xr[c] - mu);
    const float m = static_cast<float>(mu);
    const float rs = 1.0f / std::sqrt(static_cast<float>(ss / C) + eps);
    mean_out[r] = m;
    rs_out[r] = rs;
    for (int64_t c = 0; c < C; ++c) yv[r * C + c] = (xr[c] - m) * rs * wp[c] + bp[c];
  }
  store(y, yv);
}

// x̂ = (x − mean)·r; with g = dy·w:  dx_j = r · (g_j − mean_c(g_c) − x̂_j · mean_c(g_c · x̂_c)),
// dw = Σ_rows dy·x̂, db = Σ_rows dy. An undefined dx, dw or db is not computed.
void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, Tensor& db, bool accumulate_dx) {
  const int64_t R = x.rows(), C = x.cols();
  const bool need_dx = dx.defined(), need_dw = dw.defined(), need_db = db.defined();
  const std::vector<float> xv = x.to_f32_vector(), dyv = dy.to_f32_vector();
  const float* wp = w.data_as<const float>();
  const float* mp = mean.data_as<const float>();
  const float* rsp = rstd.data_as<const float>();
  std::vector<float> dxv(need_dx ? xv.size() : 0);
  std::vector<double> dw_acc(need_dw ? C : 0, 0.0), db_acc(need_db ? C : 0, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &xv[r * C];
    const float* gr = &dyv[r * C];
    const float m = mp[r], rs = rsp[r];
    if (need_dx) {
      double sum_g = 0, sum_gx = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float g = gr[c] * wp[c];
        sum_g += g;
        sum_gx += static_cast<double>(g) * ((xr[c] - m) * rs);
      }
      const float mean_g = static_cast<float>(sum_g / C), mean_gx = static_cast<float>(sum_gx / C);
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (xr[c] - m) * rs;
        dxv[r * C + c] = rs * (gr[c] * wp[c] - mean_g - xhat * mean_gx);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      if (need_dw) dw_acc[c] += static_cast<double>(gr[c]) * ((xr[c] - m) * rs);
      if (need_db) db_acc[c] += gr[c];
    }
  }
  if (need_dx) store_dx(dx, dxv, accumulate_dx);
  if (need_dw) {
    float* dwp = dw.data_as<float>();
    for (int64_t c = 0; c < C; ++c) dwp[c] = static_cast<float>(dw_acc[c]);
  }
  if (need_db) {
    float* dbp = db.data_as<float>();
    for (int64_t c = 0; c < C; ++c) dbp[c] = static_cast<float>(db_acc[c]);
  }
}

}  // namespace omniq::cpu
