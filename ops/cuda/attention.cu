// CUDA attention with GQA, built from cuBLASLt GEMMs (cuda::gemm) and fused row-softmax kernels.
//
// Correctness-first design: per batch element b, the scores of all Hq heads are materialised as an
// fp32 [Hq, T, T] buffer (O(Hq·T²) memory, reused across b), never O(B·Hq·T²).
//   forward :  S = scale·Q·Kᵀ  ->  P = causal_softmax(S) (+lse)  ->  O = P·V
//   backward:  S = scale·Q·Kᵀ, dP = dO·Vᵀ  ->  P = exp(S − lse), dS = P ⊙ (dP − δ), δ = rowsum(dO⊙O)
//              dV = Pᵀ·dO,  dQ = scale·dS·K,  dK = scale·dSᵀ·Q
// No transposes: a head's rows in [B, T, H, D] are a strided matrix (ld = H·D) and heads are D
// apart, which cuBLASLt's (ld, batch stride) describe directly. GQA: for each g < G = Hq/Hkv one
// GEMM batched over the Hkv kv heads handles query heads h = kvh·G + g (batch stride G·D in Q,
// D in K/V). dK/dV sum over the G query heads of a kv head by accumulating (beta = 1) into fp32.
//
// bf16/f16 with D ∈ {64, 128} (the models' case) goes to the flash kernels instead
// (ops/cuda/flash_attention.cu: O(T) memory, tensor-core tiles); this materialised path remains for
// f32 (the tests' exact reference on the GPU) and other head sizes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "ops/attention.h"
#include "ops/cuda/elementwise_util.cuh"
#include "ops/cuda/flash_attention.h"
#include "ops/matmul.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// fp32 load/store of f32, bf16 and f16 elements (round to nearest even): ops/cuda/elementwise_util.cuh.
using ew::from_f32;
using ew::to_f32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `red` is 32 floats of shared memory; the trailing sync makes it reusable right away.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? red[lane] : (kMax ? -INFINITY : 0.f);
  r = kMax ? warp_max(r) : warp_sum(r);
  __syncthreads();
  return r;
}

// One block per row of a [rows, T] score matrix (row r is query i = r % T of its [T, T] matrix):
//   p[j] = exp(scale·s[j] − m) / l for j < len (len = i + 1 if causal, else T), 0 beyond;
//   lse[r] = m + log(l) when lse != nullptr. Three passes over a row that stays in L1/L2.
// s and p may alias (in-place fp32): every element is read and written by the same thread.
template <typename Tin, typename Tout>
__global__ void softmax_rows_kernel(const Tin* s, Tout* p, float* __restrict__ lse, int64_t T, float scale,
                                    bool causal) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const int64_t len = causal ? r % T + 1 : T;
  const Tin* srow = s + r * T;
  Tout* prow = p + r * T;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, scale * to_f32(srow[j]));
  m = block_reduce<true>(m, red);
  float l = 0.f;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) l += expf(scale * to_f32(srow[j]) - m);
  l = block_reduce<false>(l, red);
  const float inv_l = 1.f / l;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x)
    prow[j] = from_f32<Tout>(j < len ? expf(scale * to_f32(srow[j]) - m) * inv_l : 0.f);
  if (lse != nullptr && threadIdx.x == 0) lse[r] = m + logf(l);
}

// Standalone causal softmax backward, one block per row:
//   ds[j] = scale · p[j] · (dp[j] − Σ_k p[k]·dp[k]) for j <= i, 0 beyond.
template <typename T>
__global__ void softmax_backward_rows_kernel(const T* __restrict__ dp, const T* __restrict__ p, T* __restrict__ ds,
                                             int64_t Tn, float scale) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const int64_t len = r % Tn + 1;
  const T* prow = p + r * Tn;
  const T* dprow = dp + r * Tn;
  T* dsrow = ds + r * Tn;
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) acc += to_f32(prow[j]) * to_f32(dprow[j]);
  const float sum = block_reduce<false>(acc, red);
  for (int64_t j = threadIdx.x; j < Tn; j += blockDim.x)
    dsrow[j] = from_f32<T>(j < len ? scale * to_f32(prow[j]) * (to_f32(dprow[j]) - sum) : 0.f);
}

// delta[b, h, t] = Σ_d dO[b, t, h, d] · O[b, t, h, d]: one warp per (b, t, h) row of D elements.
template <typename T>
__global__ void attn_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                                  int64_t rows, int64_t Tn, int64_t Hq, int64_t D) {
  const int64_t row = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp, and no block-level sync follows
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) s += to_f32(dout[row * D + d]) * to_f32(out[row * D + d]);
  s = warp_sum(s);
  if (lane == 0) {
    const int64_t h = row % Hq, bt = row / Hq;
    delta[((bt / Tn) * Hq + h) * Tn + bt % Tn] = s;
  }
}

// Attention backward row kernel for one batch element, one block per row r = h·T + i of [Hq·T, T]:
//   P = exp(S − lse[r]) masked (S already holds scale·q·k),  dS = P ⊙ (dP − delta[r]).
// P may alias S and dS may alias dP (fp32 case): each element is read, then written, by one thread.
template <typename Tp>
__global__ void attn_backward_rows_kernel(const float* s, const float* dp, const float* __restrict__ lse,
                                          const float* __restrict__ delta, Tp* p, Tp* ds, int64_t T, bool causal) {
  const int64_t r = blockIdx.x;
  const int64_t len = causal ? r % T + 1 : T;
  const float lse_r = lse[r], delta_r = delta[r];
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    const int64_t idx = r * T + j;
    float pv = 0.f, dsv = 0.f;
    if (j < len) {
      pv = expf(s[idx] - lse_r);
      dsv = pv * (dp[idx] - delta_r);
    }
    p[idx] = from_f32<Tp>(pv);
    ds[idx] = from_f32<Tp>(dsv);
  }
}

// ---------------------------------------------------------------------------------------------
// helpers

template <typename F>
void with_float_type(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(static_cast<float*>(nullptr)); break;
    case DType::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::f16: f(static_cast<__half*>(nullptr)); break;
    default: OMNIQ_FAIL("CUDA attention: unsupported dtype %s", dtype_name(dt));
  }
}

// Threads per row-kernel block: enough warps to cover short rows, at most 256 (8 elements per
// thread at T = 2048).
int row_block(int64_t T) {
  const int64_t warps = (T + 31) / 32;
  return static_cast<int>(warps >= 8 ? 256 : warps * 32);
}

unsigned int row_grid(int64_t rows, const char* op) {
  OMNIQ_CHECK(rows <= 2147483647, "%s: %lld rows exceed the CUDA grid limit", op, (long long)rows);
  return static_cast<unsigned int>(rows);
}

// Address of element `off` of t (works for any dtype).
void* elem(const Tensor& t, int64_t off) {
  return static_cast<char*>(t.data()) + off * static_cast<int64_t>(dtype_size(t.dtype()));
}

// Sizes of one problem and the cuBLASLt arguments shared by its GEMMs.
struct Problem {
  int64_t B, T, Hq, Hkv, D, G;
  int device;
  DType dt;
  Problem(const Tensor& q, const Tensor& k)
      : B(q.size(0)), T(q.size(1)), Hq(q.size(2)), Hkv(k.size(2)), D(q.size(3)), G(q.size(2) / k.size(2)),
        device(q.device().index), dt(q.dtype()) {}
  int64_t q_batch() const { return T * Hq * D; }   // elements per batch element in q/out
  int64_t kv_batch() const { return T * Hkv * D; }  // ... in k/v
  int64_t tt() const { return T * T; }

  // A GEMM batched over the Hkv kv heads for query-head offset g (query head h = kvh·G + g).
  GemmArgs base(int64_t M, int64_t N, int64_t K) const {
    GemmArgs a;
    a.device = device;
    a.M = M, a.N = N, a.K = K;
    a.batch = Hkv;
    return a;
  }
  // Operand "query-side head h of batch element b" in a [B, T, Hq, D] tensor: [T, D], ld Hq·D.
  void q_side(const Tensor& t, int64_t b, int64_t g, const void** p, int64_t* ld, int64_t* stride) const {
    *p = elem(t, b * q_batch() + g * D), *ld = Hq * D, *stride = G * D;
  }
  // Operand "kv head kvh of batch element b" in a [B, T, Hkv, D] tensor: [T, D], ld Hkv·D.
  void kv_side(const Tensor& t, int64_t b, const void** p, int64_t* ld, int64_t* stride) const {
    *p = elem(t, b * kv_batch()), *ld = Hkv * D, *stride = D;
  }
  // Head h's [T, T] slice of a [Hq, T, T] buffer.
  void tt_side(const Tensor& t, int64_t g, const void** p, int64_t* ld, int64_t* stride) const {
    *p = elem(t, g * tt()), *ld = T, *stride = G * tt();
  }
};

// S[h] = alpha · X_h · Y_kvhᵀ for all heads of batch element b into the f32 buffer s [Hq, T, T],
// where X is a [B,T,Hq,D] tensor (q or dout) and Y a [B,T,Hkv,D] one (k or v).
void scores_gemm(const Problem& pr, int64_t b, const Tensor& x, const Tensor& y, float alpha, const Tensor& s) {
  for (int64_t g = 0; g < pr.G; ++g) {
    GemmArgs a = pr.base(pr.T, pr.T, pr.D);
    a.trans_b = true;
    a.alpha = alpha;
    a.ab_type = pr.dt, a.c_type = DType::f32;
    pr.q_side(x, b, g, &a.A, &a.lda, &a.stride_a);
    pr.kv_side(y, b, &a.B, &a.ldb, &a.stride_b);
    const void* c;
    pr.tt_side(s, g, &c, &a.ldc, &a.stride_c);
    a.C = const_cast<void*>(c);
    gemm(a);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers and ops

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out) {
  if (flash_attention_supported(q, k, v)) return flash_attention_forward(q, k, v, scale, causal, lse_out);
  const Problem pr(q, k);
  const Device dev = q.device();
  cudaStream_t stream = cuda_context(dev).stream;
  Tensor out = Tensor::empty(q.shape(), pr.dt, dev);
  Tensor lse = Tensor::empty(Shape{pr.B, pr.Hq, pr.T}, DType::f32, dev);
  Tensor s = Tensor::empty(Shape{pr.Hq, pr.T, pr.T}, DType::f32, dev);
  // P feeds the P·V GEMM, whose operands share one dtype: fp32 in place, else a second buffer.
  Tensor p = pr.dt == DType::f32 ? s.alias() : Tensor::empty(Shape{pr.Hq, pr.T, pr.T}, pr.dt, dev);
  const unsigned int rows = row_grid(pr.Hq * pr.T, "attention_forward");
  const int block = row_block(pr.T);
  for (int64_t b = 0; b < pr.B; ++b) {
    scores_gemm(pr, b, q, k, scale, s);  // S = scale · Q·Kᵀ
    with_float_type(pr.dt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      softmax_rows_kernel<float, T><<<rows, block, 0, stream>>>(s.data_as<float>(), p.data_as<T>(),
                                                                lse.data_as<float>() + b * pr.Hq * pr.T, pr.T,
                                                                1.f, causal);
      CUDA_CHECK_LAUNCH();
    });
    for (int64_t g = 0; g < pr.G; ++g) {  // O_h = P_h · V_kvh, written straight into [B, T, Hq, D]
      GemmArgs a = pr.base(pr.T, pr.D, pr.T);
      a.ab_type = a.c_type = pr.dt;
      pr.tt_side(p, g, &a.A, &a.lda, &a.stride_a);
      pr.kv_side(v, b, &a.B, &a.ldb, &a.stride_b);
      const void* c;
      pr.q_side(out, b, g, &c, &a.ldc, &a.stride_c);
      a.C = const_cast<void*>(c);
      gemm(a);
    }
  }
  if (lse_out) *lse_out = std::move(lse);
  return out;
}

AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal) {
  const Problem pr(q, k);
  const Device dev = q.device();
  cudaStream_t stream = cuda_context(dev).stream;
  const bool f32 = pr.dt == DType::f32;

  // δ = rowsum(dO ⊙ O) for all batch elements at once ([B, Hq, T] f32).
  Tensor delta = Tensor::empty(Shape{pr.B, pr.Hq, pr.T}, DType::f32, dev);
  {
    const int64_t drows = pr.B * pr.T * pr.Hq;
    const int warps_per_block = 8;
    with_float_type(pr.dt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      attn_delta_kernel<T><<<grid_for(drows, warps_per_block), warps_per_block * 32, 0, stream>>>(
          dout.data_as<T>(), out.data_as<T>(), delta.data_as<float>(), drows, pr.T, pr.Hq, pr.D);
      CUDA_CHECK_LAUNCH();
    });
  }
  if (flash_attention_supported(q, k, v, &dout)) return flash_attention_backward(dout, q, k, v, delta, lse, scale, causal);

  const Shape tt{pr.Hq, pr.T, pr.T};
  Tensor s = Tensor::empty(tt, DType::f32, dev);
  Tensor dp = Tensor::empty(tt, DType::f32, dev);
  Tensor p = f32 ? s.alias() : Tensor::empty(tt, pr.dt, dev);
  Tensor ds = f32 ? dp.alias() : Tensor::empty(tt, pr.dt, dev);

  AttentionGrads grads;
  grads.dq = Tensor::empty(q.shape(), pr.dt, dev);
  // dK/dV accumulate over the G query heads of a kv head: in fp32 (the outputs themselves for f32).
  Tensor dk_acc = Tensor::empty(k.shape(), DType::f32, dev);
  Tensor dv_acc = Tensor::empty(k.shape(), DType::f32, dev);

  const unsigned int rows = row_grid(pr.Hq * pr.T, "attention_backward");
  const int block = row_block(pr.T);
  for (int64_t b = 0; b < pr.B; ++b) {
    scores_gemm(pr, b, q, k, scale, s);  // S  = scale · Q·Kᵀ
    scores_gemm(pr, b, dout, v, 1.f, dp);  // dP = dO · Vᵀ
    with_float_type(pr.dt, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const int64_t off = b * pr.Hq * pr.T;
      attn_backward_rows_kernel<T><<<rows, block, 0, stream>>>(s.data_as<float>(), dp.data_as<float>(),
                                                               lse.data_as<float>() + off,
                                                               delta.data_as<float>() + off, p.data_as<T>(),
                                                               ds.data_as<T>(), pr.T, causal);
      CUDA_CHECK_LAUNCH();
    });
    for (int64_t g = 0; g < pr.G; ++g) {
      const void* c;
      // dV_kvh (+)= P_hᵀ · dO_h
      GemmArgs a = pr.base(pr.T, pr.D, pr.T);
      a.trans_a = true;
      a.beta = g == 0 ? 0.f : 1.f;
      a.ab_type = pr.dt, a.c_type = DType::f32;
      pr.tt_side(p, g, &a.A, &a.lda, &a.stride_a);
      pr.q_side(dout, b, g, &a.B, &a.ldb, &a.stride_b);
      pr.kv_side(dv_acc, b, &c, &a.ldc, &a.stride_c);
      a.C = const_cast<void*>(c);
      gemm(a);
      // dK_kvh (+)= scale · dS_hᵀ · Q_h
      a.alpha = scale;
      pr.tt_side(ds, g, &a.A, &a.lda, &a.stride_a);
      pr.q_side(q, b, g, &a.B, &a.ldb, &a.stride_b);
      pr.kv_side(dk_acc, b, &c, &a.ldc, &a.stride_c);
      a.C = const_cast<void*>(c);
      gemm(a);
      // dQ_h = scale · dS_h · K_kvh, straight into [B, T, Hq, D]
      GemmArgs d = pr.base(pr.T, pr.D, pr.T);
      d.alpha = scale;
      d.ab_type = d.c_type = pr.dt;
      pr.tt_side(ds, g, &d.A, &d.lda, &d.stride_a);
      pr.kv_side(k, b, &d.B, &d.ldb, &d.stride_b);
      pr.q_side(grads.dq, b, g, &c, &d.ldc, &d.stride_c);
      d.C = const_cast<void*>(c);
      gemm(d);
    }
  }
  grads.dk = f32 ? std::move(dk_acc) : dk_acc.to(pr.dt);
  grads.dv = f32 ? std::move(dv_acc) : dv_acc.to(pr.dt);
  return grads;
}

Tensor causal_softmax_forward(const Tensor& scores, float scale) {
  const int64_t T = scores.size(-1);
  const unsigned int rows = row_grid(scores.numel() / T, "causal_softmax_forward");
  Tensor probs = Tensor::empty(scores.shape(), scores.dtype(), scores.device());
  cudaStream_t stream = cuda_context(scores.device()).stream;
  with_float_type(scores.dtype(), [&](auto* tag) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    softmax_rows_kernel<T_, T_><<<rows, row_block(T), 0, stream>>>(scores.data_as<T_>(), probs.data_as<T_>(),
                                                                   nullptr, T, scale, true);
    CUDA_CHECK_LAUNCH();
  });
  return probs;
}

Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale) {
  const int64_t T = probs.size(-1);
  const unsigned int rows = row_grid(probs.numel() / T, "causal_softmax_backward");
  Tensor dscores = Tensor::empty(probs.shape(), probs.dtype(), probs.device());
  cudaStream_t stream = cuda_context(probs.device()).stream;
  with_float_type(probs.dtype(), [&](auto* tag) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    softmax_backward_rows_kernel<T_><<<rows, row_block(T), 0, stream>>>(dprobs.data_as<T_>(), probs.data_as<T_>(),
                                                                        dscores.data_as<T_>(), T, scale);
    CUDA_CHECK_LAUNCH();
  });
  return dscores;
}

}  // namespace omniq::cuda
