// Device helpers shared by the f32/bf16 kernels (elementwise, activation, rope, embedding, reduce,
// norm, loss, fake_quant): fp32 load/store of the storage types (f16 too, for matmul and attention),
// 4-element packs and N-element 16-byte vector access, the f32/bf16 dtype dispatch, alignment checks
// and the grid of a grid-stride launch. Include only from .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "runtime/cuda_context.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

namespace omniq::cuda::ew {

// ---- element access: every kernel does its math in fp32 -------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even (as __float2bfloat16 / __float2half), like the host's f32_to_bf16 and
// f32_to_f16, so CPU and CUDA 16-bit results agree.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Four consecutive elements moved as one 16-byte (f32) or 8-byte (bf16) access. Rows are contiguous,
// so when the row length and the base pointers allow it, a thread handles 4 elements per trip.
template <typename T> struct alignas(4 * sizeof(T)) Pack4 { T v[4]; };

template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t i, float (&out)[4]) {
  Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p + i);
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = to_f32(pk.v[q]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t i, const float (&in)[4]) {
  Pack4<T> pk;
#pragma unroll
  for (int q = 0; q < 4; ++q) pk.v[q] = from_f32<T>(in[q]);
  *reinterpret_cast<Pack4<T>*>(p + i) = pk;
}

// N consecutive elements starting at p, as fp32. When N·sizeof(T) is a multiple of 16 bytes the
// access is done with 16-byte vectors (the launcher checked the alignment, see aligned16), else
// element by element.
template <int N, typename T>
__device__ __forceinline__ void load_n(const T* p, float (&out)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kChunks = static_cast<int>(N * sizeof(T) / 16);
    uint4 raw[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) raw[k] = reinterpret_cast<const uint4*>(p)[k];
    const T* v = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(p[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_n(T* p, const float (&in)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kChunks = static_cast<int>(N * sizeof(T) / 16);
    uint4 raw[kChunks];
    T* v = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = from_f32<T>(in[i]);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) reinterpret_cast<uint4*>(p)[k] = raw[k];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_f32<T>(in[i]);
  }
}

__device__ __forceinline__ int64_t thread_index() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- host side ---------------------------------------------------------------------------------

constexpr int kBlock = 256;

// True when p may be read as Pack4 of elements of dtype dt (views made by view_rows can be offset).
inline bool pack4_aligned(const void* p, DType dt) {
  return reinterpret_cast<uintptr_t>(p) % (4 * dtype_size(dt)) == 0;
}

// Grid of a grid-stride loop: enough 256-thread blocks to fill every SM (8 per SM = 2048 threads,
// full occupancy on Hopper) and no more, so large tensors take several trips around the loop.
inline unsigned int stride_grid(int64_t n, const CudaContext& ctx, int block = kBlock) {
  unsigned int g = grid_for(n, block);
  unsigned int cap = static_cast<unsigned int>(ctx.prop.multiProcessorCount) * (2048u / block);
  if (cap == 0) cap = 1;
  return g < cap ? g : cap;
}

// True when p may be accessed with 16-byte vectors (load_n/store_n with a full vector).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(vec_tag, block_row_tag) with std::bool_constant tags, so a launcher picks the vector width
// and the row layout (warp or block per row) at compile time.
template <typename F>
void with_row_layout(bool vec, bool block_row, F&& f) {
  if (vec) {
    if (block_row) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (block_row) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the CUDA storage type of dt; only f32 and bf16 have kernels.
template <typename F>
void dispatch_f32_bf16(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::bf16: f(TypeTag<__nv_bfloat16>{}); return;
    default: OMNIQ_FAIL("%s: the CUDA kernels support f32 and bf16 tensors, got %s", op, dtype_name(dt));
  }
}

}  // namespace omniq::cuda::ew
