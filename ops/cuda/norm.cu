// CUDA RMSNorm / LayerNorm: forward, dx, and deterministic dw/db column sums. Semantics in ops/norm.h.
//
// Layout: rows are independent, so one group of threads owns one row — a warp when C <= 1024 (8 rows
// per block), otherwise a whole block. Row statistics are warp-shuffle sums (plus one trip through
// shared memory in the block case); rows are re-read for the second pass, which hits L1/L2 because
// a row is at most a few tens of KB. When C and the pointers allow it, each thread moves 16 bytes per
// access (4 f32 or 8 bf16). Napkin math: the forward reads x twice and writes y once, ~3·2 bytes per
// bf16 element: a 4096×4096 bf16 tensor is ~100 MB of traffic, ~30 µs at H100 bandwidth.
//
// dw/db = Σ_rows (...) are column reductions: the rows are cut into at most 256 chunks, one kernel
// writes per-chunk partial sums into an f32 scratch [chunks, C], a second sums the chunks in order.
// The chunking depends only on the shape, so results are bitwise reproducible (no float atomics).
#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/norm.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using bf16 = __nv_bfloat16;
using ew::from_f32;
using ew::to_f32;

// =============================================================================================
// CUDA kernels
// =============================================================================================

// What a tensor of element type T stores for v (RMSNorm rounds x̂ through it; identity for f32).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Butterfly sum: every lane ends with the same bits (fp addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the threads that own one row: a warp (kBlockRow == false, blockDim = (32, rows/block))
// or the whole block (kBlockRow == true, blockDim = (threads, 1)). Every thread gets the total.
// smem: 32 floats; the leading barrier lets a kernel call this several times.
template <bool kBlockRow>
__device__ __forceinline__ float group_sum(float v, float* smem) {
  v = warp_sum(v);
  if constexpr (kBlockRow) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = warp_sum(lane < nwarps ? smem[lane] : 0.0f);
  }
  return v;
}

// y = RMSNorm(x)·w (kLayer == false) or LayerNorm(x)·w + b (kLayer == true); one row per group.
template <typename T, int kVec, bool kBlockRow, bool kLayer>
__global__ void norm_forward_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ b, T* __restrict__ y, float* __restrict__ mean_out,
                                    float* __restrict__ rstd_out, int64_t rows, int C, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) return;  // only in warp mode, where no barrier follows
  const T* xr = x + row * C;
  T* yr = y + row * C;
  const int first = threadIdx.x * kVec, step = blockDim.x * kVec;

  float mu = 0.0f;
  if constexpr (kLayer) {
    float s = 0.0f;
    for (int c = first; c < C; c += step) {
      float v[kVec];
      ew::load_n<kVec>(xr + c, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) s += v[i];
    }
    mu = group_sum<kBlockRow>(s, smem) / C;
  }
  float ss = 0.0f;  // Σ (x − mean)² (two-pass: no cancellation when |mean| >> std)
  for (int c = first; c < C; c += step) {
    float v[kVec];
    ew::load_n<kVec>(xr + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) ss += (v[i] - mu) * (v[i] - mu);
  }
  const float rs = rsqrtf(group_sum<kBlockRow>(ss, smem) / C + eps);
  if (threadIdx.x == 0) {
    rstd_out[row] = rs;
    if constexpr (kLayer) mean_out[row] = mu;
  }
  for (int c = first; c < C; c += step) {
    float v[kVec], wv[kVec], o[kVec];
    ew::load_n<kVec>(xr + c, v);
    ew::load_n<kVec>(w + c, wv);
    if constexpr (kLayer) {
      float bv[kVec];
      ew::load_n<kVec>(b + c, bv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = (v[i] - mu) * rs * wv[i] + bv[i];
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = wv[i] * round_to<T>(v[i] * rs);  // HF: w · x̂.to(dtype)
    }
    ew::store_n<kVec>(yr + c, o);
  }
}

// dx of RMSNorm / LayerNorm for one row per group (formulas in ops/cpu/norm.cpp):
//   g = dy·w, x̂ = (x − mean)·rstd,  dx = rstd·(g − mean(g)·[LayerNorm] − x̂·mean(g·x̂)).
// accumulate: dx already holds a gradient; write old + dx (fp32, one rounding). Each element is
// read and rewritten by the thread that owns it, in the pass that writes dx anyway, so this costs
// one extra read instead of a separate add pass (read two tensors, write one). A runtime flag, not
// a template parameter: the branch is uniform and the kernel is bandwidth-bound. Measured (ncu,
// H100, [2048, 4096] bf16): 21.2 µs accumulating vs 16.9 µs fresh, against ~15 µs for the
// add_inplace it replaces.
template <typename T, int kVec, bool kBlockRow, bool kLayer>
__global__ void norm_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const float* __restrict__ w, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int C,
                                        bool accumulate) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) return;
  const T* xr = x + row * C;
  const T* gr = dy + row * C;
  T* dxr = dx + row * C;
  const int first = threadIdx.x * kVec, step = blockDim.x * kVec;
  const float mu = kLayer ? mean[row] : 0.0f;
  const float rs = rstd[row];

  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int c = first; c < C; c += step) {
    float xv[kVec], gv[kVec], wv[kVec];
    ew::load_n<kVec>(xr + c, xv);
    ew::load_n<kVec>(gr + c, gv);
    ew::load_n<kVec>(w + c, wv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float g = gv[i] * wv[i];
      sum_g += g;
      sum_gx += g * ((xv[i] - mu) * rs);
    }
  }
  const float mean_g = kLayer ? group_sum<kBlockRow>(sum_g, smem) / C : 0.0f;
  const float mean_gx = group_sum<kBlockRow>(sum_gx, smem) / C;
  for (int c = first; c < C; c += step) {
    float xv[kVec], gv[kVec], wv[kVec], o[kVec];
    ew::load_n<kVec>(xr + c, xv);
    ew::load_n<kVec>(gr + c, gv);
    ew::load_n<kVec>(w + c, wv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = rs * (gv[i] * wv[i] - mean_g - ((xv[i] - mu) * rs) * mean_gx);
    if (accumulate) {
      float prev[kVec];
      ew::load_n<kVec>(dxr + c, prev);
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = prev[i] + o[i];
    }
    ew::store_n<kVec>(dxr + c, o);
  }
}

constexpr int kDwCols = 32;     // columns per block (one per lane: a warp reads 32 consecutive elements)
constexpr int kDwRowLanes = 16;  // threads per column, striding over the chunk's rows

// Partial column sums over one chunk of rows: part_dw[chunk, c] = Σ dy·x̂, part_db[chunk, c] = Σ dy
// (each only when its pointer is non-null: a gradient that is not needed is not written).
// grid = (ceil(C / 32), chunks), block = (32, 16). Every (chunk, c < C) is written, even when empty.
template <typename T, bool kLayer>
__global__ void norm_dw_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const float* __restrict__ mean, const float* __restrict__ rstd,
                                       int64_t rows, int C, int64_t rows_per_chunk, float* __restrict__ part_dw,
                                       float* __restrict__ part_db) {
  __shared__ float s_dw[kDwRowLanes][kDwCols + 1];
  __shared__ float s_db[kDwRowLanes][kDwCols + 1];
  const int c = blockIdx.x * kDwCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float acc_w = 0.0f, acc_b = 0.0f;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kDwRowLanes) {
      const float g = to_f32(dy[r * C + c]);
      const float xv = to_f32(x[r * C + c]);
      // RMSNorm multiplies w by x̂ rounded to x's dtype (see ops/norm.h); LayerNorm does not round.
      const float xhat = kLayer ? (xv - mean[r]) * rstd[r] : round_to<T>(xv * rstd[r]);
      acc_w += g * xhat;
      acc_b += g;
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = acc_w;
  s_db[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float sw = 0.0f, sb = 0.0f;
    for (int k = 0; k < kDwRowLanes; ++k) {  // fixed order: deterministic
      sw += s_dw[k][threadIdx.x];
      sb += s_db[k][threadIdx.x];
    }
    if (part_dw) part_dw[blockIdx.y * static_cast<int64_t>(C) + c] = sw;
    if (kLayer && part_db) part_db[blockIdx.y * static_cast<int64_t>(C) + c] = sb;
  }
}

// out[c] = Σ_k part[k, c], summed in chunk order.
__global__ void column_sum_kernel(const float* __restrict__ part, int64_t chunks, int C, float* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) s += part[k * C + c];
  out[c] = s;
}

// =============================================================================================
// kernel launchers
// =============================================================================================

constexpr int kWarpRowMaxC = 1024;  // up to this many channels a warp owns a row
constexpr int kWarpRowsPerBlock = 8;

template <typename F>
void with_dtype(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(static_cast<float*>(nullptr)); return;
    case DType::bf16: f(static_cast<bf16*>(nullptr)); return;
    default:
      OMNIQ_FAIL("%s: the CUDA kernels support f32 and bf16 x, got %s (convert with .to(DType::bf16))", op,
                 dtype_name(dt));
  }
}

struct RowLaunch {
  dim3 grid, block;
  bool block_row;
};

RowLaunch row_launch(int64_t rows, int64_t C, const char* op) {
  OMNIQ_CHECK(rows < (int64_t{1} << 31), "%s: %lld rows is more than one launch handles", op,
              static_cast<long long>(rows));
  RowLaunch l;
  l.block_row = C > kWarpRowMaxC;
  if (l.block_row) {
    l.block = dim3(C <= 4096 ? 256 : 512, 1);
    l.grid = dim3(static_cast<unsigned int>(rows));
  } else {
    l.block = dim3(32, kWarpRowsPerBlock);
    l.grid = dim3(static_cast<unsigned int>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock));
  }
  return l;
}

// 16-byte accesses need C to be a multiple of the pack and every row pointer 16-byte aligned.
bool can_vectorise(int64_t C, DType dt, std::initializer_list<const void*> ptrs) {
  if (C % static_cast<int64_t>(16 / dtype_size(dt)) != 0) return false;
  for (const void* p : ptrs)
    if (p && !ew::aligned16(p)) return false;
  return true;
}

template <bool kLayer>
void launch_forward(const Tensor& x, const Tensor& w, const Tensor* b, float eps, Tensor& y, Tensor* mean,
                    Tensor& rstd, const char* op) {
  const int64_t rows = x.rows();
  const int C = static_cast<int>(x.cols());
  CudaContext& ctx = cuda_context(x.device());
  const RowLaunch l = row_launch(rows, C, op);
  const bool vec =
      can_vectorise(C, x.dtype(), {x.data(), y.data(), w.data(), b ? b->data() : nullptr});
  with_dtype(x.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ew::with_row_layout(vec, l.block_row, [&](auto vec_tag, auto block_tag) {
      constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
      norm_forward_kernel<T, kVec, decltype(block_tag)::value, kLayer><<<l.grid, l.block, 0, ctx.stream>>>(
          x.data_as<const T>(), w.data_as<const float>(), b ? b->data_as<const float>() : nullptr, y.data_as<T>(),
          mean ? mean->data_as<float>() : nullptr, rstd.data_as<float>(), rows, C, eps);
      CUDA_CHECK_LAUNCH();
    });
  });
}

// dx, dw, db: each computed only when defined (ops/norm.h: a gradient that is not needed is left
// undefined). The dw/db partial sums share one kernel, which runs when either is needed.
template <bool kLayer>
void launch_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor* mean, const Tensor& rstd,
                     Tensor& dx, Tensor& dw, Tensor* db, bool accumulate_dx, const char* op) {
  const int64_t rows = x.rows();
  const int C = static_cast<int>(x.cols());
  CudaContext& ctx = cuda_context(x.device());
  const float* mean_p = mean ? mean->data_as<const float>() : nullptr;
  const bool need_dx = dx.defined(), need_dw = dw.defined(), need_db = kLayer && db && db->defined();

  if (need_dx) {
    const RowLaunch l = row_launch(rows, C, op);
    const bool vec = can_vectorise(C, x.dtype(), {x.data(), dy.data(), dx.data(), w.data()});
    with_dtype(x.dtype(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      ew::with_row_layout(vec, l.block_row, [&](auto vec_tag, auto block_tag) {
        constexpr int kVec = decltype(vec_tag)::value ? static_cast<int>(16 / sizeof(T)) : 1;
        norm_backward_dx_kernel<T, kVec, decltype(block_tag)::value, kLayer><<<l.grid, l.block, 0, ctx.stream>>>(
            dy.data_as<const T>(), x.data_as<const T>(), w.data_as<const float>(), mean_p,
            rstd.data_as<const float>(), dx.data_as<T>(), rows, C, accumulate_dx);
        CUDA_CHECK_LAUNCH();
      });
    });
  }
  if (!need_dw && !need_db) return;

  // Chunking of the dw/db column sums: >= 64 rows per chunk, <= 256 chunks (scratch <= 256·C floats
  // per gradient). It depends on the shape only, so the sums are the same whichever are needed.
  const int64_t chunks = std::min<int64_t>((rows + 63) / 64, 256);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  Tensor scratch = Tensor::empty(Shape{int64_t{need_dw} + int64_t{need_db}, chunks, C}, DType::f32, x.device());
  float* part_dw = need_dw ? scratch.data_as<float>() : nullptr;
  float* part_db = need_db ? scratch.data_as<float>() + (need_dw ? chunks * C : 0) : nullptr;

  with_dtype(x.dtype(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const dim3 grid(static_cast<unsigned int>((C + kDwCols - 1) / kDwCols), static_cast<unsigned int>(chunks));
    norm_dw_partial_kernel<T, kLayer><<<grid, dim3(kDwCols, kDwRowLanes), 0, ctx.stream>>>(
        dy.data_as<const T>(), x.data_as<const T>(), mean_p, rstd.data_as<const float>(), rows, C, rows_per_chunk,
        part_dw, part_db);
    CUDA_CHECK_LAUNCH();
  });
  if (need_dw) {
    column_sum_kernel<<<grid_for(C, 256), 256, 0, ctx.stream>>>(part_dw, chunks, C, dw.data_as<float>());
    CUDA_CHECK_LAUNCH();
  }
  if (need_db) {
    column_sum_kernel<<<grid_for(C, 256), 256, 0, ctx.stream>>>(part_db, chunks, C, db->data_as<float>());
    CUDA_CHECK_LAUNCH();
  }
  // scratch is freed stream-ordered when it goes out of scope: after the kernels above.
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  launch_forward<false>(x, w, nullptr, eps, y, nullptr, rstd, "rmsnorm_forward");
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                      bool accumulate_dx) {
  launch_backward<false>(dy, x, w, nullptr, rstd, dx, dw, nullptr, accumulate_dx, "rmsnorm_backward");
}

void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y, Tensor& mean,
                       Tensor& rstd) {
  launch_forward<true>(x, w, &b, eps, y, &mean, rstd, "layernorm_forward");
}

void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                        Tensor& dx, Tensor& dw, Tensor& db, bool accumulate_dx) {
  launch_backward<true>(dy, x, w, &mean, rstd, dx, dw, &db, accumulate_dx, "layernorm_backward");
}

}  // namespace omniq::cuda
