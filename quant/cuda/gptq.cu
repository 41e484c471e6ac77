// CUDA backend of GPTQ (algorithm: quant/gptq.h; CPU twin: cpu::gptq_quantize_prepared in
// quant/gptq.cpp). The Hessian factorisation is done on the host in double (gptq_detail::
// prepare_hessian: no cuSOLVER in the build); its upper factor U is uploaded once per Hessian.
//
// Rows of W are independent given U, so the in-block column loop runs one warp per weight row: the
// warp walks the block's columns in order, every lane computes the same q and err of column c
// (broadcast read of W[r, c]), lane 0 stores them, and the lanes update the later columns of the
// block in a strided loop (coalesced reads of W[r, ·] and of U's row c). __syncwarp orders those
// writes before the next column is read. The row segment stays in L1; the work per block is
// out·bs²/2 multiply-subtracts, next to which the inter-block update W[:, i2:] −= Err·U[i1:i2, i2:]
// (cuBLASLt, fp32 compute) dominates: out·in²/… flops in total, like the reference.
//
// The quantizer (both range rules of quant/gptq.h, with optional LWC clip factors) uses the
// explicitly rounded intrinsics (as ops/cuda/fake_quant.cu) so it matches the CPU bit for bit; the in-block update uses __fmul_rn/__fsub_rn like the
// CPU's non-contracted err·u then w − (·). Differences from the CPU come only from the GEMM's
// summation order (and then from quantization decisions that flip near a rounding boundary).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/matmul.h"
#include "quant/gptq.h"
#include "runtime/cuda_context.h"
#include "runtime/error.h"

namespace omniq::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// CUDA kernels

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float quantize_rn(float x, float scale, float zp, float qlo, float qhi) {
  const float u = __fdiv_rn(x, scale);
  const float t = rintf(u);
  const float v = __fadd_rn(t, zp);
  const float q = fminf(fmaxf(v, qlo), qhi);
  return __fmul_rn(__fsub_rn(q, zp), scale);
}

// The quantizer's rule (quant/gptq.h; CPU twin: Rule in quant/gptq.cpp).
struct Rule {
  float qlo, qhi, div;
  bool sym, contain_zero;
};

// One warp per (row r, set k in [k0, k1)): min/max of W[r, k·len .. k·len+len) -> scale, zero point
// by quant/gptq.h's formulas, clip factors chi/clo (null = 1) applied to max/min. min/max are exact,
// so the reduction order is free; the rest is the CPU's sequence of fp32 operations.
__global__ void gptq_params_kernel(const float* __restrict__ W, int64_t out, int64_t in, int64_t len, int64_t k0,
                                   int64_t k1, int64_t nsets, Rule R, const float* __restrict__ chi,
                                   const float* __restrict__ clo, float* __restrict__ scale, float* __restrict__ zp) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t nk = k1 - k0;
  if (warp >= out * nk) return;
  const int64_t r = warp / nk, k = k0 + warp % nk;
  const float* x = W + r * in + k * len;
  float xmax = x[0], xmin = x[0];
  for (int64_t i = lane; i < len; i += 32) {
    xmax = fmaxf(xmax, x[i]);
    xmin = fminf(xmin, x[i]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    xmax = fmaxf(xmax, __shfl_xor_sync(0xffffffffu, xmax, o));
    xmin = fminf(xmin, __shfl_xor_sync(0xffffffffu, xmin, o));
  }
  if (lane != 0) return;
  const int64_t idx = r * nsets + k;
  const float a = chi ? chi[idx] : 1.0f, b = clo ? clo[idx] : 1.0f;
  float s, z = 0.0f;
  if (R.contain_zero) {  // the original GPTQ Quantizer.find_params
    xmax = fmaxf(xmax, 0.0f);
    xmin = fminf(xmin, 0.0f);
    float hi = __fmul_rn(a, xmax), lo = __fmul_rn(b, xmin);
    if (R.sym) {
      const float m = fmaxf(fabsf(lo), fabsf(hi));
      lo = -m;
      hi = m;
    }
    if (hi == 0.0f && lo == 0.0f) {
      lo = -1.0f;
      hi = 1.0f;
    }
    s = __fdiv_rn(__fsub_rn(hi, lo), R.div);
    if (!R.sym) z = rintf(__fdiv_rn(-lo, s));
  } else {  // ops/fake_quant.h
    const float hi = __fmul_rn(a, xmax), lo = __fmul_rn(b, xmin);
    const float raw = R.sym ? __fdiv_rn(fmaxf(fabsf(hi), fabsf(lo)), R.div) : __fdiv_rn(__fsub_rn(hi, lo), R.div);
    s = fminf(fmaxf(raw, 1e-5f), 1e4f);
    if (!R.sym) z = rintf(fminf(fmaxf(__fdiv_rn(-lo, s), -1e4f), 1e4f));
  }
  scale[idx] = s;
  zp[idx] = z;
}

// The column loop of one block [i1, i2): one warp per row (see the file comment).
__global__ void gptq_block_kernel(float* __restrict__ Wp, float* __restrict__ Q, float* __restrict__ Err,
                                  const float* __restrict__ U, const float* __restrict__ scale,
                                  const float* __restrict__ zp, const int32_t* __restrict__ col_set, int64_t out,
                                  int64_t in, int64_t nsets, int64_t i1, int64_t i2, int64_t bs, float qlo, float qhi) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= out) return;
  float* wr = Wp + r * in;
  for (int64_t c = i1; c < i2; ++c) {
    const float x = wr[c];
    const int64_t s = r * nsets + col_set[c];
    const float q = quantize_rn(x, scale[s], zp[s], qlo, qhi);
    const float* urow = U + c * in;
    const float err = __fdiv_rn(__fsub_rn(x, q), urow[c]);
    if (lane == 0) {
      Q[r * in + c] = q;
      Err[r * bs + (c - i1)] = err;
    }
    for (int64_t j = c + 1 + lane; j < i2; j += 32) wr[j] = __fsub_rn(wr[j], __fmul_rn(err, urow[j]));
    __syncwarp();
  }
}

// dst[r, j] = idx[j] < 0 ? 0 : src[r, idx[j]]  (column permutation / dead-column zeroing).
__global__ void gather_cols_kernel(const float* __restrict__ src, const int32_t* __restrict__ idx,
                                   float* __restrict__ dst, int64_t out, int64_t in) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= out * in) return;
  const int64_t r = e / in, j = e % in;
  const int32_t c = idx[j];
  dst[e] = c < 0 ? 0.0f : src[r * in + c];
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

void launch_params(const Tensor& W, int64_t len, int64_t k0, int64_t k1, int64_t nsets, const Rule& R,
                   const Tensor* chi, const Tensor* clo, Tensor& scale, Tensor& zp, cudaStream_t st) {
  const int64_t out = W.size(0), in = W.size(1);
  const int64_t warps = out * (k1 - k0);
  if (warps <= 0) return;
  gptq_params_kernel<<<grid_for(warps, kWarpsPerBlock), kWarpsPerBlock * 32, 0, st>>>(
      W.data_as<float>(), out, in, len, k0, k1, nsets, R, chi ? chi->data_as<float>() : nullptr,
      clo ? clo->data_as<float>() : nullptr, scale.data_as<float>(), zp.data_as<float>());
  CUDA_CHECK_LAUNCH();
}

Tensor gather_cols(const Tensor& src, const std::vector<int32_t>& idx, cudaStream_t st) {
  const int64_t out = src.size(0), in = src.size(1);
  Tensor d_idx = Tensor::from_i32(idx, {in}, src.device());
  Tensor dst = Tensor::empty(src.shape(), DType::f32, src.device());
  gather_cols_kernel<<<grid_for(out * in, 256), 256, 0, st>>>(src.data_as<float>(), d_idx.data_as<int32_t>(),
                                                              dst.data_as<float>(), out, in);
  CUDA_CHECK_LAUNCH();
  return dst;
}

}  // namespace

Tensor gptq_quantize_prepared(const Tensor& w, const gptq_detail::PreparedHessian& ph, const WeightQuantSpec& spec,
                              const GptqOptions& opt, const GptqClip* clip) {
  const Device dev = w.device();
  cudaStream_t st = cuda_context(dev).stream;
  const int64_t out = w.size(0), in = w.size(1), bs = opt.block_size;
  Rule R;  // as rule_of in quant/gptq.cpp
  R.sym = spec.symmetric;
  R.contain_zero = opt.range_contains_zero;
  R.qlo = spec.symmetric ? -static_cast<float>(1 << (spec.bits - 1)) : 0.0f;
  R.qhi = spec.symmetric ? static_cast<float>((1 << (spec.bits - 1)) - 1) : static_cast<float>((1 << spec.bits) - 1);
  R.div = spec.symmetric && opt.range_contains_zero ? static_cast<float>((1 << spec.bits) - 1) : R.qhi;
  const float qlo = R.qlo, qhi = R.qhi;
  const gptq_detail::GroupPlan plan = gptq_detail::plan_groups(in, spec, opt, ph);
  const bool grouped = spec.group_size > 0;
  Tensor scale = Tensor::empty({out * plan.nsets}, DType::f32, dev);
  Tensor zp = Tensor::empty({out * plan.nsets}, DType::f32, dev);
  Tensor chi_t, clo_t;  // clip factors [out·nsets] on the device
  if (clip) {
    chi_t = Tensor::from_f32(clip->hi, {out * plan.nsets}, DType::f32, dev);
    clo_t = Tensor::from_f32(clip->lo, {out * plan.nsets}, DType::f32, dev);
  }
  const Tensor* chi = clip ? &chi_t : nullptr;
  const Tensor* clo = clip ? &clo_t : nullptr;

  if (!grouped) launch_params(w, in, 0, 1, 1, R, chi, clo, scale, zp, st);  // step 1: original W
  std::vector<int32_t> keep(static_cast<size_t>(in));
  for (int64_t i = 0; i < in; ++i) keep[static_cast<size_t>(i)] = ph.dead[static_cast<size_t>(i)] ? -1 : static_cast<int32_t>(i);
  Tensor Wz = gather_cols(w, keep, st);                                                // step 2 (also the working copy)
  if (grouped && opt.static_groups) launch_params(Wz, plan.len, 0, plan.nsets, plan.nsets, R, chi, clo, scale, zp, st);
  Tensor Wp = opt.act_order ? gather_cols(Wz, ph.perm, st) : std::move(Wz);            // step 4

  Tensor U = Tensor::from_f32(ph.hinv, {in, in}, DType::f32, dev);
  Tensor col_set = Tensor::from_i32(plan.col_set, {in}, dev);
  Tensor Q = Tensor::empty({out, in}, DType::f32, dev);
  Tensor Err = Tensor::empty({out, bs}, DType::f32, dev);
  for (int64_t i1 = 0; i1 < in; i1 += bs) {                                            // step 6
    const int64_t i2 = std::min(i1 + bs, in), count = i2 - i1;
    if (grouped && !opt.static_groups) {
      const int64_t k0 = (i1 + plan.len - 1) / plan.len, k1 = (i2 + plan.len - 1) / plan.len;
      launch_params(Wp, plan.len, k0, k1, plan.nsets, R, chi, clo, scale, zp, st);
    }
    gptq_block_kernel<<<grid_for(out, kWarpsPerBlock), kWarpsPerBlock * 32, 0, st>>>(
        Wp.data_as<float>(), Q.data_as<float>(), Err.data_as<float>(), U.data_as<float>(), scale.data_as<float>(),
        zp.data_as<float>(), col_set.data_as<int32_t>(), out, in, plan.nsets, i1, i2, bs, qlo, qhi);
    CUDA_CHECK_LAUNCH();
    if (i2 < in) {  // W[:, i2:] -= Err · U[i1:i2, i2:]
      GemmArgs g;
      g.device = dev.index;
      g.M = out;
      g.N = in - i2;
      g.K = count;
      g.alpha = -1.0f;
      g.beta = 1.0f;
      g.A = Err.data_as<float>();
      g.lda = bs;
      g.B = U.data_as<float>() + i1 * in + i2;
      g.ldb = in;
      g.C = Wp.data_as<float>() + i2;
      g.ldc = in;
      gemm(g);
    }
  }
  if (!opt.act_order) return Q;
  std::vector<int32_t> inv(static_cast<size_t>(in));
  for (int64_t j = 0; j < in; ++j) inv[static_cast<size_t>(ph.perm[static_cast<size_t>(j)])] = static_cast<int32_t>(j);
  return gather_cols(Q, inv, st);
}

void gptq_accumulate_hessian(Tensor& H, const Tensor& x, float alpha, float beta) {
  const int64_t in = x.cols(), n = x.rows();
  OMNIQ_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::bf16 || x.dtype() == DType::f16,
              "gptq_accumulate_hessian: CUDA x must be f32, bf16 or f16, got %s", x.str().c_str());
  GemmArgs g;  // H[in, in] = alpha · Xᵀ X + beta · H
  g.device = x.device().index;
  g.trans_a = true;
  g.M = in;
  g.N = in;
  g.K = n;
  g.alpha = alpha;
  g.beta = beta;
  g.ab_type = x.dtype();
  g.c_type = DType::f32;
  g.A = x.data();
  g.lda = in;
  g.B = x.data();
  g.ldb = in;
  g.C = H.data();
  g.ldc = in;
  gemm(g);
}

}  // namespace omniq::cuda
