// cp.async building blocks of the streaming fake-quant kernels (fake_quant_backward_stream.cu,
// fake_quant_lwc_update_stream.cu): copies of global memory into shared memory that stay in flight
// while the thread computes on an earlier stage, a view of a thread's vectors in a stage, and the
// (cached) occupancy query the persistent launchers size their grids with.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
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

// Grid of a persistent grid-stride loop over `tiles` equal tiles, `occ` resident blocks per SM on `sms`
// SMs. The kernel takes as long as its busiest SM, and blocks land on SMs breadth-first (block b on SM
// b mod sms in the first wave), so an SM's load is the sum over its blocks b ≡ s (mod sms) of
// ⌊tiles/G⌋ + (b < tiles mod G). Two candidates: equal tiles per block (G = ⌈tiles/rounds⌉, which
// leaves some SMs one block short: LLaMA-7B 4096×4096 g128, 2048 tiles, 3 × 132 slots → G = 342, the
// busiest SM 18 tiles) and every slot filled (G = 396: 16 tiles); the one with the smaller busiest SM.
inline int64_t persistent_grid(int64_t tiles, int occ, int sms) {
  const int64_t slots = static_cast<int64_t>(occ) * sms;
  if (tiles <= slots) return tiles;
  auto busiest = [&](int64_t G) {
    const int64_t base = tiles / G, extra = tiles % G;
    int64_t worst = 0;
    for (int64_t s = 0; s < sms; ++s) {
      int64_t load = 0;
      for (int64_t b = s; b < G; b += sms) load += base + (b < extra ? 1 : 0);
      worst = load > worst ? load : worst;
    }
    return worst;
  };
  const int64_t rounds = (tiles + slots - 1) / slots, equal = (tiles + rounds - 1) / rounds;
  return busiest(slots) < busiest(equal) ? slots : equal;
}

}  // namespace omniq::cuda::fq
