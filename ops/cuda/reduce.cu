// CUDA reductions (see reduce.h). Every result is computed in a fixed order, without float atomics,
// so repeated calls on the same GPU give bitwise-identical results.
//
// Row reductions: rows are contiguous, so one block (long rows) or one warp (short rows) owns a row
// and reduces it with warp shuffles. Column reductions read [32 columns x 8 rows] tiles so a warp
// touches 32 consecutive elements of one row (coalesced); the rows are split into chunks so enough
// blocks run, and a second pass sums the per-chunk partials in chunk order.
// sum_all: grid-stride partial sums in double per block, then one block adds the partials.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/reduce.h"

namespace omniq::cuda {

namespace {

using ew::to_f32;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

template <ReduceOp OP> struct Red;
template <> struct Red<ReduceOp::sum> {
  __device__ static float init() { return 0.0f; }
  __device__ static float map(float v) { return v; }
  __device__ static float join(float a, float b) { return a + b; }
};
template <> struct Red<ReduceOp::min> {
  __device__ static float init() { return INFINITY; }
  __device__ static float map(float v) { return v; }
  __device__ static float join(float a, float b) { return fminf(a, b); }
};
template <> struct Red<ReduceOp::max> {
  __device__ static float init() { return -INFINITY; }
  __device__ static float map(float v) { return v; }
  __device__ static float join(float a, float b) { return fmaxf(a, b); }
};
template <> struct Red<ReduceOp::absmax> {
  __device__ static float init() { return 0.0f; }
  __device__ static float map(float v) { return fabsf(v); }
  __device__ static float join(float a, float b) { return fmaxf(a, b); }
};

// Butterfly: every lane ends with the warp's total (a+b == b+a in IEEE, so all lanes agree).
template <ReduceOp OP>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Red<OP>::join(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// blockDim.x is a multiple of 32; every thread returns the block's total. scratch: 32 floats.
template <ReduceOp OP>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce<OP>(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : Red<OP>::init();
  v = warp_reduce<OP>(v);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

// Sum of this thread's share of row[0, C): 4-wide packs when vec (C % 4 == 0, row aligned).
template <ReduceOp OP, typename T>
__device__ __forceinline__ float thread_row_partial(const T* row, int64_t C, int first, int step, bool vec) {
  float acc = Red<OP>::init();
  if (vec) {
    for (int64_t c = 4 * static_cast<int64_t>(first); c < C; c += 4 * static_cast<int64_t>(step)) {
      float v[4];
      ew::load4(row, c, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) acc = Red<OP>::join(acc, Red<OP>::map(v[q]));
    }
  } else {
    for (int64_t c = first; c < C; c += step) acc = Red<OP>::join(acc, Red<OP>::map(to_f32(row[c])));
  }
  return acc;
}

// One block per row (grid-stride over rows), for long rows.
template <ReduceOp OP, typename T>
__global__ void row_reduce_block_kernel(const T* x, float* out, int64_t R, int64_t C, bool vec) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    float acc = thread_row_partial<OP>(x + r * C, C, threadIdx.x, blockDim.x, vec);
    acc = block_reduce<OP>(acc, scratch);
    if (threadIdx.x == 0) out[r] = acc;
  }
}

// One warp per row (grid-stride over rows), for short rows where a block would mostly idle.
template <ReduceOp OP, typename T>
__global__ void row_reduce_warp_kernel(const T* x, float* out, int64_t R, int64_t C, bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = ew::thread_count() / 32;
  for (int64_t r = ew::thread_index() / 32; r < R; r += nwarps) {  // uniform per warp: shuffles are safe
    float acc = thread_row_partial<OP>(x + r * C, C, lane, 32, vec);
    acc = warp_reduce<OP>(acc);
    if (lane == 0) out[r] = acc;
  }
}

constexpr int kColTileX = 32, kColTileY = 8;

// Pass 1 of a column reduction: block (32, 8) reduces columns [32*bx, 32*bx+32) over the rows of
// chunk by; writes partial[by, c]. With a single chunk, partial is the output.
template <ReduceOp OP, typename T>
__global__ void col_reduce_partial_kernel(const T* x, float* partial, int64_t R, int64_t C, int64_t rows_per_chunk) {
  __shared__ float tile[kColTileY][kColTileX + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTileX + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(R, r0 + rows_per_chunk);
  float acc = Red<OP>::init();
  if (c < C)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColTileY) acc = Red<OP>::join(acc, Red<OP>::map(to_f32(x[r * C + c])));
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc = tile[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kColTileY; ++k) acc = Red<OP>::join(acc, tile[k][threadIdx.x]);
    partial[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
  }
}

// Pass 2: out[c] = join over chunks of partial[k, c], in chunk order (map was applied in pass 1).
template <ReduceOp OP>
__global__ void col_reduce_final_kernel(const float* partial, float* out, int64_t chunks, int64_t C) {
  for (int64_t c = ew::thread_index(); c < C; c += ew::thread_count()) {
    float acc = partial[c];
    for (int64_t k = 1; k < chunks; ++k) acc = Red<OP>::join(acc, partial[k * C + c]);
    out[c] = acc;
  }
}

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ double block_sum_double(double v) {
  __shared__ double scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum_double(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0;
  return warp_sum_double(v);
}

// Pass 1 of sum_all: each block writes the double sum of its grid-stride share to partial[block].
template <typename T>
__global__ void sum_partial_kernel(const T* x, int64_t n, double* partial, bool vec) {
  double acc = 0.0;
  int64_t start = 0;
  if (vec) {
    const int64_t n4 = n / 4;
    for (int64_t k = ew::thread_index(); k < n4; k += ew::thread_count()) {
      float v[4];
      ew::load4(x, 4 * k, v);
      acc += (static_cast<double>(v[0]) + v[1]) + (static_cast<double>(v[2]) + v[3]);
    }
    start = 4 * n4;
  }
  for (int64_t i = start + ew::thread_index(); i < n; i += ew::thread_count()) acc += to_f32(x[i]);
  acc = block_sum_double(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Pass 2: one block adds the partials in a fixed order; out[0] = total / divisor.
__global__ void sum_final_kernel(const double* partial, int64_t nparts, double divisor, float* out) {
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < nparts; k += blockDim.x) acc += partial[k];
  acc = block_sum_double(acc);
  if (threadIdx.x == 0) out[0] = static_cast<float>(acc / divisor);
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

// Calls f(std::integral_constant<ReduceOp, op>) so the kernels are specialised per statistic.
template <typename F>
void dispatch_op(ReduceOp op, F&& f) {
  switch (op) {
    case ReduceOp::sum: f(std::integral_constant<ReduceOp, ReduceOp::sum>{}); return;
    case ReduceOp::min: f(std::integral_constant<ReduceOp, ReduceOp::min>{}); return;
    case ReduceOp::max: f(std::integral_constant<ReduceOp, ReduceOp::max>{}); return;
    case ReduceOp::absmax: f(std::integral_constant<ReduceOp, ReduceOp::absmax>{}); return;
  }
}

}  // namespace

Tensor row_reduce(ReduceOp op, const Tensor& x) {
  const int64_t R = x.rows(), C = x.cols();
  Tensor out = Tensor::empty(Shape{R}, DType::f32, x.device());
  if (R == 0) return out;
  CudaContext& ctx = cuda_context(x.device());
  const bool vec = C % 4 == 0 && ew::pack4_aligned(x.data(), x.dtype());
  ew::dispatch_f32_bf16(x.dtype(), "row reduction", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* px = static_cast<const T*>(x.data());
    float* po = out.data_as<float>();
    dispatch_op(op, [&](auto opc) {
      constexpr ReduceOp OP = decltype(opc)::value;
      if (C <= 512) {  // <= 16 elements per lane: a warp per row keeps every lane busy
        row_reduce_warp_kernel<OP, T><<<ew::stride_grid(R * 32, ctx), ew::kBlock, 0, ctx.stream>>>(px, po, R, C, vec);
      } else {
        const unsigned int cap = static_cast<unsigned int>(ctx.prop.multiProcessorCount) * 8u;
        const unsigned int grid = static_cast<unsigned int>(R < cap ? R : cap);
        row_reduce_block_kernel<OP, T><<<grid, ew::kBlock, 0, ctx.stream>>>(px, po, R, C, vec);
      }
      CUDA_CHECK_LAUNCH();
    });
  });
  return out;
}

Tensor col_reduce(ReduceOp op, const Tensor& x) {
  const int64_t R = x.rows(), C = x.cols();
  if (R == 0 || C == 0) return Tensor::zeros(Shape{C}, DType::f32, x.device());  // empty sum (checked upstream)
  Tensor out = Tensor::empty(Shape{C}, DType::f32, x.device());
  CudaContext& ctx = cuda_context(x.device());
  // Split the rows so about 8 blocks per SM run, with at least 32 rows (4 per thread) per chunk.
  const int64_t col_blocks = (C + kColTileX - 1) / kColTileX;
  const int64_t target = static_cast<int64_t>(ctx.prop.multiProcessorCount) * 8;
  int64_t chunks = std::min<int64_t>((R + 31) / 32, std::max<int64_t>(1, target / col_blocks));
  chunks = std::min<int64_t>(std::max<int64_t>(chunks, 1), 65535);
  const int64_t rows_per_chunk = (R + chunks - 1) / chunks;
  chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
  Tensor partial;
  if (chunks > 1) partial = Tensor::empty(Shape{chunks, C}, DType::f32, x.device());
  float* pp = chunks > 1 ? partial.data_as<float>() : out.data_as<float>();
  ew::dispatch_f32_bf16(x.dtype(), "column reduction", [&](auto tt) {
    using T = typename decltype(tt)::type;
    dispatch_op(op, [&](auto opc) {
      constexpr ReduceOp OP = decltype(opc)::value;
      dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks));
      dim3 block(kColTileX, kColTileY);
      col_reduce_partial_kernel<OP, T><<<grid, block, 0, ctx.stream>>>(static_cast<const T*>(x.data()), pp, R, C,
                                                                        rows_per_chunk);
      CUDA_CHECK_LAUNCH();
      if (chunks > 1) {
        col_reduce_final_kernel<OP><<<ew::stride_grid(C, ctx), ew::kBlock, 0, ctx.stream>>>(pp, out.data_as<float>(),
                                                                                          chunks, C);
        CUDA_CHECK_LAUNCH();
      }
    });
  });
  return out;  // partial is released stream-ordered after the kernels that use it
}

Tensor sum_all(const Tensor& x, bool mean) {
  const int64_t n = x.numel();
  Tensor out = Tensor::empty(Shape{1}, DType::f32, x.device());
  CudaContext& ctx = cuda_context(x.device());
  const int64_t nparts = ew::stride_grid(n > 0 ? (n + 3) / 4 : 1, ctx);
  // The partials are doubles; there is no f64 dtype, so they live in an f32 buffer twice as long
  // (pool allocations are 256-byte aligned, so the cast is aligned).
  Tensor partial = Tensor::empty(Shape{2 * nparts}, DType::f32, x.device());
  double* pp = reinterpret_cast<double*>(partial.data());
  const bool vec = ew::pack4_aligned(x.data(), x.dtype());
  ew::dispatch_f32_bf16(x.dtype(), mean ? "mean_all" : "sum_all", [&](auto tt) {
    using T = typename decltype(tt)::type;
    sum_partial_kernel<T><<<static_cast<unsigned int>(nparts), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(x.data()), n, pp, vec);
    CUDA_CHECK_LAUNCH();
  });
  sum_final_kernel<<<1, ew::kBlock, 0, ctx.stream>>>(pp, nparts, mean ? static_cast<double>(n) : 1.0,
                                                     out.data_as<float>());
  CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace omniq::cuda
