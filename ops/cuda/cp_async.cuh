// cp.async building blocks of the streaming fake-quant kernels (fake_quant_backward_stream.cu,
// fake_quant_lwc_update_stream.cu): copies of global memory into shared memory that stay in flight
// while the thread computes on an earlier stage, a view of a thread's vectors in a stage, and the
// (cached) occupancy query the persistent launchers size their grids with.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "ops/cuda/fake_quant_common.cuh"
#include "runtime/cuda_check.h"

namespace omniq::cuda::fq {

// A thread's vectors in a stage, read on use (keeps registers for the math): vector j at p[j·stride].
template <typename T, int N>
struct SmemPacks {
  const Pack<T, N>* p;
  int stride;
  __device__ __forceinline__ Pack<T, N> operator[](int j) const { return p[j * stride]; }
};

template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(kBytes) : "memory");
}
// One object of type P (4, 8, 16 or a multiple of 16 bytes, aligned to its size up to 16).
template <typename P>
__device__ __forceinline__ void copy_async(P* dst, const P* src) {
  constexpr int kChunk = sizeof(P) >= 16 ? 16 : static_cast<int>(sizeof(P));
  static_assert(sizeof(P) % kChunk == 0 && (kChunk == 4 || kChunk == 8 || kChunk == 16), "cp.async sizes");
#pragma unroll
  for (int o = 0; o < static_cast<int>(sizeof(P)); o += kChunk)
    cp_async<kChunk>(reinterpret_cast<char*>(dst) + o, reinterpret_cast<const char*>(src) + o);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Blocks of `kernel` per SM with `smem` bytes of dynamic shared memory, after allowing at least that
// much. The attribute (cudaFuncAttributeMaxDynamicSharedMemorySize) is per kernel and device, not per
// launch: it is only ever raised (to the largest smem asked for so far), because the same kernel runs
// with different smem sizes (rows of 11008 and of 4096 in one training step) and lowering it for a
// short row would make the next long-row launch fail ("invalid argument"). The occupancy is cached per
// (kernel, device, block, smem), so these calls happen once per shape (the first, eager step) and
// never while a CUDA graph is being captured or per launch.
inline int stream_blocks_per_sm(const void* kernel, int device, int block, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // the attribute as set, per (kernel, device)
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, block, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  size_t& cur = allowed[{kernel, device}];
  if (smem > cur) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    cur = smem;
  }
  int occ = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, block, smem));
  cache.emplace(key, occ);
  return occ;
}

}  // namespace omniq::cuda::fq
