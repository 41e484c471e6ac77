// CPU reference of the GEMM ops: everything in fp32 through cpu::gemm_f32. bf16/f16 inputs are
// widened to f32 first (exact) and results rounded back once at the end, which is what the CUDA
// path does too (fp32 accumulation, one rounding of the output).
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/matmul.h"

namespace omniq::cpu {

namespace {

// The tensor's fp32 data on the host: its own buffer when already f32, else a widened copy kept
// alive in `holder`.
const float* host_f32(const Tensor& t, Tensor& holder) {
  if (t.dtype() == DType::f32) return t.data_as<float>();
  holder = t.to(DType::f32);
  return holder.data_as<float>();
}

// An fp32 result converted to the requested dtype (no copy when it already is f32).
Tensor finish(Tensor y32, DType dt) { return dt == DType::f32 ? std::move(y32) : y32.to(dt); }

Shape with_last_dim(const Shape& s, int64_t n) {
  Shape out = s;
  out.dims[out.ndim - 1] = n;
  return out;
}

}  // namespace

Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* residual) {
  const int64_t R = x.rows(), K = x.cols(), N = w.size(0);
  Tensor xh, wh, bh, rh;
  const float* X = host_f32(x, xh);
  const float* W = host_f32(w, wh);
  Tensor y = Tensor::empty(with_last_dim(x.shape(), N), DType::f32);
  float* Y = y.data_as<float>();
  // Y[R, N] = X[R, K] · W[N, K]ᵀ
  gemm_f32(false, true, R, N, K, 1.f, X, K, W, K, 0.f, Y, N);
  if (bias) {
    const float* b = host_f32(*bias, bh);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) Y[r * N + n] += b[n];
  }
  if (residual) {
    // The residual joins the fp32 sum before the single rounding (the CUDA epilogue's β·C).
    const float* Rp = host_f32(*residual, rh);
    for (int64_t i = 0; i < R * N; ++i) Y[i] += Rp[i];
  }
  return finish(std::move(y), x.dtype());
}

void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx) {
  const int64_t R = dx.rows(), K = dx.cols(), N = w.size(0);
  Tensor dyh, wh;
  const float* DY = host_f32(dy, dyh);
  const float* W = host_f32(w, wh);
  // prod[R, K] = dY[R, N] · W[N, K] in fp32, then old + prod in fp32 and one rounding into dx. For
  // f32 this is bitwise what a fresh dx followed by add_inplace gives.
  Tensor prod = Tensor::empty(dx.shape(), DType::f32);
  float* P = prod.data_as<float>();
  gemm_f32(false, false, R, K, N, 1.f, DY, N, W, K, 0.f, P, K);
  std::vector<float> old = dx.to_f32_vector();
  for (int64_t i = 0; i < R * K; ++i) P[i] = old[static_cast<size_t>(i)] + P[i];
  dx.copy_from(prod);
}

LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db) {
  const int64_t R = x.rows(), K = x.cols(), N = w.size(0);
  Tensor dyh, xh, wh;
  const float* DY = host_f32(dy, dyh);
  LinearGrads g;
  if (need_dx) {
    // dX[R, K] = dY[R, N] · W[N, K]
    const float* W = host_f32(w, wh);
    Tensor dx = Tensor::empty(x.shape(), DType::f32);
    gemm_f32(false, false, R, K, N, 1.f, DY, N, W, K, 0.f, dx.data_as<float>(), K);
    g.dx = finish(std::move(dx), x.dtype());
  }
  if (need_dw) {
    // dW[N, K] = dY[R, N]ᵀ · X[R, K]   (stays f32: it is a parameter gradient)
    const float* X = host_f32(x, xh);
    g.dw = Tensor::empty(w.shape(), DType::f32);
    gemm_f32(true, false, N, K, R, 1.f, DY, N, X, K, 0.f, g.dw.data_as<float>(), K);
  }
  if (need_db) {
    // db[N] = Σ_r dY[r, :], accumulated in double so the reference is better than what it checks.
    std::vector<double> acc(static_cast<size_t>(N), 0.0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) acc[n] += DY[r * N + n];
    g.db = Tensor::empty(Shape{N}, DType::f32);
    float* db = g.db.data_as<float>();
    for (int64_t n = 0; n < N; ++n) db[n] = static_cast<float>(acc[n]);
  }
  return g;
}

Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha, DType out_dtype) {
  const int64_t M = trans_a ? a.size(-1) : a.size(-2);
  const int64_t K = trans_a ? a.size(-2) : a.size(-1);
  const int64_t N = trans_b ? b.size(-2) : b.size(-1);
  int64_t batch = 1;
  for (int i = 0; i + 2 < a.ndim(); ++i) batch *= a.size(i);
  const int64_t lda = a.size(-1), ldb = b.size(-1);
  const int64_t stride_a = a.size(-1) * a.size(-2), stride_b = b.size(-1) * b.size(-2);

  Shape out_shape = a.shape();
  out_shape.dims[out_shape.ndim - 2] = M;
  out_shape.dims[out_shape.ndim - 1] = N;
  Tensor ah, bh;
  const float* A = host_f32(a, ah);
  const float* B = host_f32(b, bh);
  Tensor c = Tensor::empty(out_shape, DType::f32);
  float* C = c.data_as<float>();
  for (int64_t i = 0; i < batch; ++i)
    gemm_f32(trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, 0.f, C + i * M * N, N);
  return finish(std::move(c), out_dtype);
}

}  // namespace omniq::cpu
