// Hopper (sm_90) building blocks for warp-specialised kernels: shared-memory mbarriers, named barriers
// over a subset of the CTA's warps, bulk asynchronous copies and reductions from shared to global memory
// (the TMA engine without a tensor map), and warpgroup register reallocation (setmaxnreg). Used by the
// flash attention backward v3 (ops/cuda/flash_attention_backward_v3ws.cu). Include only from .cu files;
// the asm compiles only where OMNIQ_WGMMA is defined (a translation unit built for sm_90a).
#pragma once
#include <cstdint>

#include "ops/cuda/wgmma.cuh"

namespace omniq::cuda::sm90 {

#ifdef OMNIQ_WGMMA
// ---- mbarrier (shared memory, CTA scope) ----
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(wgmma::smem_addr(bar)), "r"(count) : "memory");
}
// Arrive (release, CTA scope): this thread's earlier shared-memory writes are visible to a waiter.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(wgmma::smem_addr(bar)) : "memory");
}
// Waits (acquire) until the phase of parity `parity` has completed: the k-th completion of a barrier
// (k = 0, 1, ...) is waited for with parity k & 1.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra WAIT_%=;\n"
      "}\n" ::"r"(wgmma::smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---- named barriers: `threads` (a multiple of 32) threads of the CTA meet at barrier `id` (1..15;
// 0 is __syncthreads) ----
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- bulk copies shared → global (16-byte aligned addresses, sizes multiple of 16) ----
__device__ __forceinline__ void bulk_store(void* gdst, const void* ssrc, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gdst),
               "r"(wgmma::smem_addr(ssrc)), "r"(bytes)
               : "memory");
}
// gdst[i] += ssrc[i] for `bytes` / 4 floats, each add atomic in L2.
__device__ __forceinline__ void bulk_add_f32(float* gdst, const float* ssrc, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
               "r"(wgmma::smem_addr(ssrc)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's committed bulk operations have finished reading shared memory (the source may be reused).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// ... and have completed their global writes.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's async-proxy global accesses (the bulk operations) with its generic-proxy ones.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// ---- register reallocation between warpgroups (all threads of a warpgroup execute it) ----
template <int kRegs>
__device__ __forceinline__ void regs_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
#endif  // OMNIQ_WGMMA

}  // namespace omniq::cuda::sm90
