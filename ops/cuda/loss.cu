// CUDA cross entropy (forward/backward) and MSE (forward/backward). Semantics in ops/loss.h.
//
// Cross entropy: one group of threads per row (a warp when V <= 1024, else a 512-thread block). Each
// thread keeps an online (max, Σexp) pair over its slice of the row — one read of the logits — and
// the pairs are merged with warp shuffles (plus shared memory across warps). Napkin math: a
// [2048, 32000] bf16 logits tensor is 131 MB; the forward reads it once (~45 µs on an H100), the
// backward reads it twice and writes it once.
//
// MSE: a grid-stride pass writes one double partial sum per block (the grid size depends only on n),
// then a single block adds the partials in a fixed order: deterministic, no atomics, and the scalar
// stays on the device.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/loss.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using bf16 = __nv_bfloat16;
using ew::from_f32;
using ew::to_f32;

// =============================================================================================
// CUDA kernels
// =============================================================================================


// Merges the (max, Σexp(v − max)) summary (om, os) into (m, s). Symmetric in its two arguments
// (the products are kept out of FMA contraction), so butterfly shuffles leave every lane with the
// same bits. An empty summary is (−inf, 0).
__device__ __forceinline__ void merge_lse(float& m, float& s, float om, float os) {
  const float M = fmaxf(m, om);
  if (M == -INFINITY) return;
  s = __fmul_rn(s, expf(m - M)) + __fmul_rn(os, expf(om - M));
  m = M;
}

// (max, Σ exp(v − max)) of one row of V logits, owned by a warp (kBlockRow == false) or a block;
// every thread of the group gets the result. smem_m / smem_s: 32 floats each.
template <typename T, int kVec, bool kBlockRow>
__device__ __forceinline__ void row_max_sumexp(const T* row, int V, float& m_out, float& s_out, float* smem_m,
                                               float* smem_s) {
  float m = -INFINITY, s = 0.0f;
  for (int c = threadIdx.x * kVec; c < V; c += blockDim.x * kVec) {
    float v[kVec];
    ew::load_n<kVec>(row + c, v);
    float cm = v[0];
#pragma unroll
    for (int i = 1; i < kVec; ++i) cm = fmaxf(cm, v[i]);
    if (cm == -INFINITY) continue;  // contributes nothing (and would make exp(−inf + inf) = NaN)
    if (cm > m) {
      s = __fmul_rn(s, expf(m - cm));
      m = cm;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) s += expf(v[i] - m);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    merge_lse(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  if constexpr (kBlockRow) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
      smem_m[warp] = m;
      smem_s[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? smem_m[lane] : -INFINITY;
    s = lane < nwarps ? smem_s[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      merge_lse(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  }
  m_out = m;
  s_out = s;
}

// nll[r] = logsumexp(row) − row[t]; 0 when t < 0, NaN when t >= V (see ops/loss.h).
template <typename T, int kVec, bool kBlockRow>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ logits, const int32_t* __restrict__ targets,
                                             float* __restrict__ nll, int64_t N, int V) {
  __shared__ float smem_m[32], smem_s[32];
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= N) return;
  const int32_t t = targets[r];
  if (t < 0) {  // the whole group returns together, before any barrier
    if (threadIdx.x == 0) nll[r] = 0.0f;
    return;
  }
  const T* row = logits + r * V;
  float m, s;
  row_max_sumexp<T, kVec, kBlockRow>(row, V, m, s, smem_m, smem_s);
  // (m − v_t) first: for logits of large magnitude m + log(s) would lose the small log term.
  if (threadIdx.x == 0) nll[r] = t < V ? (m - to_f32(row[t])) + logf(s) : NAN;
}

// dlogits[r, j] = dnll[r]·(softmax_j − [j == t]); a zero row when t < 0, NaN when t >= V.
template <typename T, int kVec, bool kBlockRow>
__global__ void cross_entropy_backward_kernel(const float* __restrict__ dnll, const T* __restrict__ logits,
                                              const int32_t* __restrict__ targets, T* __restrict__ dlogits,
                                              int64_t N, int V) {
  __shared__ float smem_m[32], smem_s[32];
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (r >= N) return;
  const int32_t t = targets[r];
  const T* row = logits + r * V;
  T* drow = dlogits + r * V;
  const int first = threadIdx.x * kVec, step = blockDim.x * kVec;
  if (t < 0) {
    const float zero[kVec] = {};
    for (int c = first; c < V; c += step) ew::store_n<kVec>(drow + c, zero);
    return;
  }
  float m, s;
  row_max_sumexp<T, kVec, kBlockRow>(row, V, m, s, smem_m, smem_s);
  const float log_s = logf(s);  // softmax_j = exp((v_j − m) − log s): accurate for large |logits|
  const float g = t < V ? dnll[r] : NAN;
  for (int c = first; c < V; c += step) {
    float v[kVec], o[kVec];
    ew::load_n<kVec>(row + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = g * (expf((v[i] - m) - log_s) - (c + i == t ? 1.0f : 0.0f));
    ew::store_n<kVec>(drow + c, o);
  }
}

// Sum of a double over the block (blockDim.x a multiple of 32, blockDim.y == 1); valid in thread 0.
__device__ __forceinline__ double block_sum_double(double v, double* smem /*32*/) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// partial[block] = Σ (a − b)² over this block's grid-stride share. kVec elements per trip; the tail
// (n not a multiple of kVec) element by element.
template <typename T, int kVec>
__global__ void mse_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                                   double* __restrict__ partial) {
  __shared__ double smem[32];
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t npacks = n / kVec;
  double acc = 0.0;
  for (int64_t p = tid; p < npacks; p += nthreads) {
    float av[kVec], bv[kVec];
    ew::load_n<kVec>(a + p * kVec, av);
    ew::load_n<kVec>(b + p * kVec, bv);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) s += (av[i] - bv[i]) * (av[i] - bv[i]);
    acc += s;
  }
  for (int64_t i = npacks * kVec + tid; i < n; i += nthreads) {
    const float d = to_f32(a[i]) - to_f32(b[i]);
    acc += d * d;
  }
  acc = block_sum_double(acc, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// loss[0] = Σ partial / n, one block, partials visited in a fixed order.
__global__ void mse_final_kernel(const double* __restrict__ partial, int nparts, int64_t n, float* __restrict__ loss) {
  __shared__ double smem[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[i];
  acc = block_sum_double(acc, smem);
  if (threadIdx.x == 0) loss[0] = static_cast<float>(acc / static_cast<double>(n));
}

// da = (a − b)·((2/n)·dloss[0]) — the same fp32 operations as the CPU reference.
template <typename T, int kVec>
__global__ void mse_backward_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ dloss,
                                    float two_over_n, T* __restrict__ da, int64_t n) {
  const float scale = two_over_n * dloss[0];
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t npacks = n / kVec;
  for (int64_t p = tid; p < npacks; p += nthreads) {
    float av[kVec], bv[kVec], o[kVec];
    ew::load_n<kVec>(a + p * kVec, av);
    ew::load_n<kVec>(b + p * kVec, bv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = (av[i] - bv[i]) * scale;
    ew::store_n<kVec>(da + p * kVec, o);
  }
  for (int64_t i = npacks * kVec + tid; i < n; i += nthreads) da[i] = from_f32<T>((to_f32(a[i]) - to_f32(b[i])) * scale);
}

// The block trainer's loss (mse_loss_rows_with_grad): the partial sums of mse_partial_kernel and
// the gradient of mse_backward_kernel (d(loss) = 1) in one pass that reads y once and each target
// straight from its table at the device-side row index, instead of copying the row into a buffer,
// then reading y and the target twice (forward, backward). Per table k the partial sums are those
// of mse_partial_kernel bit for bit: the same grid (set by the launcher), the same packs per thread
// in the same order, the same fp32 expression per pack and the same block reduction. The gradient
// term of each table is mse_backward_kernel's value with scale = two_over_n (= two_over_n · 1.0f),
// rounded to T; two terms are added as add_inplace adds them (fp32, no FMA), then rounded again.
// partial is [kTables][gridDim.x]. A row outside [0, nrows) gives NaN partials and a NaN gradient.
template <typename T, int kVec, int kTables>
__global__ void mse_rows_grad_kernel(const T* __restrict__ y, const T* __restrict__ table0,
                                     const T* __restrict__ table1, const int32_t* __restrict__ row, int64_t nrows,
                                     int64_t m, float two_over_n, double* __restrict__ partial, T* __restrict__ dy) {
  __shared__ double smem[32];
  const int32_t r = row[0];
  const bool bad = r < 0 || r >= nrows;
  const int64_t offset = bad ? 0 : static_cast<int64_t>(r) * m;
  const float scale = bad ? NAN : two_over_n;
  const T* t0 = table0 + offset;
  const T* t1 = kTables == 2 ? table1 + offset : nullptr;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t npacks = m / kVec;
  double acc0 = 0.0, acc1 = 0.0;
  for (int64_t p = tid; p < npacks; p += nthreads) {
    float yv[kVec], av[kVec], bv[kVec], o[kVec];
    ew::load_n<kVec>(y + p * kVec, yv);
    ew::load_n<kVec>(t0 + p * kVec, av);
    if constexpr (kTables == 2) ew::load_n<kVec>(t1 + p * kVec, bv);
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      s0 += (yv[i] - av[i]) * (yv[i] - av[i]);  // as mse_partial_kernel (the same contraction)
      const float g0 = (yv[i] - av[i]) * scale;
      if constexpr (kTables == 2) {
        s1 += (yv[i] - bv[i]) * (yv[i] - bv[i]);
        const float g1 = (yv[i] - bv[i]) * scale;
        o[i] = __fadd_rn(to_f32(from_f32<T>(g0)), to_f32(from_f32<T>(g1)));
      } else {
        o[i] = g0;
      }
    }
    acc0 += s0;
    if constexpr (kTables == 2) acc1 += s1;
    ew::store_n<kVec>(dy + p * kVec, o);
  }
  for (int64_t i = npacks * kVec + tid; i < m; i += nthreads) {
    const float yi = to_f32(y[i]);
    const float d0 = yi - to_f32(t0[i]);
    acc0 += d0 * d0;
    const float g0 = d0 * scale;
    if constexpr (kTables == 2) {
      const float d1 = yi - to_f32(t1[i]);
      acc1 += d1 * d1;
      const float g1 = d1 * scale;
      dy[i] = from_f32<T>(__fadd_rn(to_f32(from_f32<T>(g0)), to_f32(from_f32<T>(g1))));
    } else {
      dy[i] = from_f32<T>(g0);
    }
  }
  acc0 = block_sum_double(acc0, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = bad ? NAN : acc0;
  if constexpr (kTables == 2) {
    __syncthreads();  // smem is reused
    acc1 = block_sum_double(acc1, smem);
    if (threadIdx.x == 0) partial[gridDim.x + blockIdx.x] = bad ? NAN : acc1;
  }
}

// loss[0] = Σ_k (Σ partial_k / n) in fp32: mse_final_kernel's sum per table, the terms added as
// the autograd add of the two losses adds them.
template <int kTables>
__global__ void mse_rows_final_kernel(const double* __restrict__ partial, int nparts, int64_t n,
                                      float* __restrict__ loss) {
  __shared__ double smem[32];
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < kTables; ++k) {
    if (k > 0) __syncthreads();  // smem is reused
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[k * nparts + i];
    acc = block_sum_double(acc, smem);
    const float term = static_cast<float>(acc / static_cast<double>(n));
    total = k == 0 ? term : __fadd_rn(total, term);
  }
  if (threadIdx.x == 0) loss[0] = total;
}

// =============================================================================================
// kernel launchers
// =============================================================================================

constexpr int kWarpRowMaxV = 1024;  // up to this vocabulary size a warp owns a row
constexpr int kWarpRowsPerBlock = 8;
constexpr int kBlockRowThreads = 512;
constexpr int kMseBlock = 256;
constexpr int kMseMaxBlocks = 1024;

// The grid of the MSE partial sums. It depends only on n, so the summation order (and the result's
// bits) is reproducible; mse_loss_rows_with_grad uses it too, to reproduce mse_loss_forward.
int mse_grid(int64_t n) {
  return static_cast<int>(
      std::min<int64_t>(std::max<int64_t>((n + kMseBlock * 16 - 1) / (kMseBlock * 16), 1), kMseMaxBlocks));
}

template <typename F>
void with_dtype(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(static_cast<float*>(nullptr)); return;
    case DType::bf16: f(static_cast<bf16*>(nullptr)); return;
    default:
      OMNIQ_FAIL("%s: the CUDA kernels support f32 and bf16 inputs, got %s (convert with .to(DType::bf16))", op,
                 dtype_name(dt));
  }
}

template <bool kForward>
void launch_cross_entropy(const Tensor* dnll, const Tensor& logits, const Tensor& targets, Tensor& out,
                          const char* op) {
  const int64_t N = logits.rows();
  const int V = static_cast<int>(logits.cols());
  OMNIQ_CHECK(N < (int64_t{1} << 31), "%s: %lld rows is more than one launch handles", op, static_cast<long long>(N));
  CudaContext& ctx = cuda_context(logits.device());
  const bool block_row = V > kWarpRowMaxV;
  const dim3 block = block_row ? dim3(kBlockRowThreads, 1) : dim3(32, kWarpRowsPerBlock);
  const dim3 grid(static_cast<unsigned int>(block_row ? N : (N + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock));
  const int64_t pack = 16 / static_cast<int64_t>(dtype_size(logits.dtype()));
  const bool vec = V % pack == 0 && ew::aligned16(logits.data()) && (kForward || ew::aligned16(out.data()));
  with_dtype(logits.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ew::with_row_layout(vec, block_row, [&](auto vec_tag, auto block_tag) {
      constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
      constexpr bool kBlockRow = decltype(block_tag)::value;
      if constexpr (kForward) {
        cross_entropy_forward_kernel<T, kVec, kBlockRow><<<grid, block, 0, ctx.stream>>>(
            logits.data_as<const T>(), targets.data_as<const int32_t>(), out.data_as<float>(), N, V);
      } else {
        cross_entropy_backward_kernel<T, kVec, kBlockRow><<<grid, block, 0, ctx.stream>>>(
            dnll->data_as<const float>(), logits.data_as<const T>(), targets.data_as<const int32_t>(),
            out.data_as<T>(), N, V);
      }
      CUDA_CHECK_LAUNCH();
    });
  });
}

// Calls f(vec_tag) for an elementwise pass over a and b (and out, when given).
template <typename F>
void with_vec(const Tensor& a, const Tensor& b, const Tensor* out, F&& f) {
  const bool vec = ew::aligned16(a.data()) && ew::aligned16(b.data()) && (!out || ew::aligned16(out->data()));
  if (vec) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& nll) {
  launch_cross_entropy<true>(nullptr, logits, targets, nll, "cross_entropy_forward");
}

void cross_entropy_backward(const Tensor& dnll, const Tensor& logits, const Tensor& targets, Tensor& dlogits) {
  launch_cross_entropy<false>(&dnll, logits, targets, dlogits, "cross_entropy_backward");
}

void mse_loss_forward(const Tensor& a, const Tensor& b, Tensor& loss) {
  const char* op = "mse_loss_forward";
  const int64_t n = a.numel();
  CudaContext& ctx = cuda_context(a.device());
  const int nblocks = mse_grid(n);
  Tensor scratch = Tensor::empty(Shape{2 * static_cast<int64_t>(nblocks)}, DType::f32, a.device());  // nblocks doubles
  double* partial = static_cast<double*>(scratch.data());
  with_dtype(a.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec(a, b, nullptr, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
      mse_partial_kernel<T, kVec><<<nblocks, kMseBlock, 0, ctx.stream>>>(a.data_as<const T>(), b.data_as<const T>(), n,
                                                                         partial);
      CUDA_CHECK_LAUNCH();
    });
  });
  mse_final_kernel<<<1, kMseBlock, 0, ctx.stream>>>(partial, nblocks, n, loss.data_as<float>());
  CUDA_CHECK_LAUNCH();
}

void mse_loss_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da) {
  const char* op = "mse_loss_backward";
  const int64_t n = a.numel();
  CudaContext& ctx = cuda_context(a.device());
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(n));  // as the CPU reference
  const unsigned int cap = std::max(1, ctx.prop.multiProcessorCount) * 8u;  // 8 blocks of 256 fill an SM
  with_dtype(a.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_vec(a, b, &da, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
      const unsigned int grid = std::min(grid_for(std::max<int64_t>(n / kVec, 1), 256), cap);
      mse_backward_kernel<T, kVec><<<grid, 256, 0, ctx.stream>>>(a.data_as<const T>(), b.data_as<const T>(),
                                                                 dloss.data_as<const float>(), two_over_n,
                                                                 da.data_as<T>(), n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                             Tensor& loss, Tensor& dy) {
  const char* op = "mse_loss_rows_with_grad";
  const int64_t m = y.numel();
  const int ntables = static_cast<int>(tables.size());
  CudaContext& ctx = cuda_context(y.device());
  // mse_loss_forward's grid: the partial sums (and the loss's bits) are a function of m alone.
  const int nblocks = mse_grid(m);
  Tensor scratch = Tensor::empty(Shape{2 * static_cast<int64_t>(ntables) * nblocks}, DType::f32, y.device());
  double* partial = static_cast<double*>(scratch.data());
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(m));  // as mse_loss_backward
  // Every row of a table is 16-byte aligned when its base is and a row is a whole number of 16-byte
  // vectors; the vector width must be the one mse_loss_forward would pick for (y, a copied row),
  // which is 16-byte aligned: so the rows must be too, or y must not be (then both go element-wise).
  bool vec = ew::aligned16(y.data()) && ew::aligned16(dy.data());
  for (const Tensor* tb : tables)
    vec = vec && ew::aligned16(tb->data()) && (m * static_cast<int64_t>(dtype_size(y.dtype()))) % 16 == 0;
  const Tensor* t1 = ntables == 2 ? tables[1] : tables[0];
  with_dtype(y.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto launch = [&](auto vec_tag, auto tables_tag) {
      constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
      constexpr int kTables = decltype(tables_tag)::value;
      mse_rows_grad_kernel<T, kVec, kTables><<<nblocks, kMseBlock, 0, ctx.stream>>>(
          y.data_as<const T>(), tables[0]->data_as<const T>(), t1->data_as<const T>(), row.data_as<const int32_t>(),
          tables[0]->size(0), m, two_over_n, partial, dy.data_as<T>());
      CUDA_CHECK_LAUNCH();
      mse_rows_final_kernel<kTables><<<1, kMseBlock, 0, ctx.stream>>>(partial, nblocks, m, loss.data_as<float>());
      CUDA_CHECK_LAUNCH();
    };
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    if (vec) {
      if (ntables == 2) launch(std::true_type{}, Two{});
      else launch(std::true_type{}, One{});
    } else {
      if (ntables == 2) launch(std::false_type{}, Two{});
      else launch(std::false_type{}, One{});
    }
  });
}

}  // namespace omniq::cuda
