// Device primitives shared by the flash attention kernels (ops/cuda/flash_attention.cu forward,
// ops/cuda/flash_attention_backward.cu backward): mma.sync m16n8k16, ldmatrix addressing, cp.async
// tile copies, and the host-side dtype/D/causal dispatch. Include only from .cu files.
//
// Fragment layouts of mma.m16n8k16 (g = lane/4, t = lane%4): A (16x16, row) a0 (g, 2t..2t+1),
// a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); B (16x8, k×n) b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g);
// C (16x8) c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1). Hence a C fragment of two adjacent n-tiles
// is directly the A fragment of the next product (P·V), and every operand comes from shared memory
// through ldmatrix.x4 (non-transposed when its contiguous dimension is the mma's k, .trans otherwise).
// Smem rows are padded by 8 elements (16 bytes) so the 8 row addresses of one ldmatrix phase hit
// distinct bank groups.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "ops/cuda/wgmma.cuh"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace omniq::cuda::flash {

constexpr int kTile = 64;       // rows of every Q/K/V/dO tile
constexpr int kThreads = 128;   // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// device primitives

template <typename E> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename E> __device__ __forceinline__ E from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// c += a·b for one 16x8x16 tile, fp32 accumulators.
template <typename E>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] receives
// (row lane/4, cols 2·(lane%4)..+1) of matrix i, or of its transpose with .trans.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Operand addressing for ldsm over a 16x16 block at (row0, col0) of a row-major smem array:
//   a_addr: matrices (r,c), (r+8,c), (r,c+8), (r+8,c+8): an A fragment (non-trans), or with .trans
//           the B fragments (b0,b1) of n-tiles col0 and col0+8 when rows are the k dimension.
//   b_addr: matrices (r,c), (r,c+8), (r+8,c), (r+8,c+8): the B fragments (b0,b1) of n-tiles row0
//           and row0+8 when rows are the n dimension (non-trans), or with .trans an A fragment
//           whose rows (m) are this array's columns.
__device__ __forceinline__ int a_off(int lane, int row0, int col0, int ld) {
  return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8;
}
__device__ __forceinline__ int b_off(int lane, int row0, int col0, int ld) {
  return (row0 + (lane & 7) + (lane >> 4) * 8) * ld + col0 + ((lane >> 3) & 1) * 8;
}

// 16-byte global->shared copy that zero-fills when !valid (src is then not read, but must still
// be a valid address: callers pass the tile's first row).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Tile of 64 rows x D from global rows `ldg` elements apart into smem rows D+8 apart; rows at or
// beyond rows_valid (past the sequence end) become zeros, so they add nothing and never NaN.
template <typename E, int D>
__device__ __forceinline__ void load_tile_async(E* s, const E* g, int64_t ldg, int rows_valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(kTile * kChunks % kThreads == 0, "tile copy must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < kTile * kChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < rows_valid;
    cp_async16(s + r * (D + 8) + col, ok ? g + r * ldg + col : g, ok);
  }
}

__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));  // one vector RED (sm_90+)
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Generic form of load_tile_async for ROWS rows copied by THREADS threads (the v2 backward's
// 128-key K/V tiles and its 256-thread CTA).
template <typename E, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows_async(E* s, const E* g, int64_t ldg, int rows_valid) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "tile copy must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < rows_valid;
    cp_async16(s + r * (D + 8) + col, ok ? g + r * ldg + col : g, ok);
  }
}

// ROWS x 128 16-bit elements from global rows `ldg` apart into the 128-byte swizzled tile layout of
// the wgmma kernels (ops/cuda/wgmma.cuh), copied by THREADS threads; rows at or past rows_valid
// become zeros (they add nothing and never NaN).
template <typename E, int ROWS, int THREADS>
__device__ __forceinline__ void load_swizzled(unsigned char* tile, const E* g, int64_t ldg, int rows_valid) {
  constexpr int kChunks = 128 / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "tile copy must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < rows_valid;
    cp_async16(tile + wgmma::swizzled_offset(ROWS, r, col), ok ? g + r * ldg + col : g, ok);
  }
}

// 4-byte global->shared copy, zero-filled when !valid (gmem must still be a valid address).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void atomic_add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);  // one vector RED (sm_90+), 16-byte aligned p
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

// ---------------------------------------------------------------------------------------------
// Pieces the forward kernels share (v1, v3): one warp's 16 query rows (row0 and row0 + 8 per
// thread) against a tile of 8·NT keys, S and O in the C fragment layout, element e of n-tile i at
// [4·i + e] (mma.sync's float[NT][4], read flat, or wgmma's accumulator).

// Online softmax in the log2 domain over one key tile: x = scale·log2(e)·s, masked entries −inf
// (only `edge` tiles check: the diagonal one when causal, the one holding the sequence end); s
// becomes P, m_run / l_run (the thread-partial row sums) are updated and alpha is the factor that
// rescales the rows of O.
template <int NT, bool kCausal>
__device__ __forceinline__ void online_softmax_tile(float* s, int kv0, int row0, int tq, int seq, bool edge,
                                                    float scale_log2, float (&m_run)[2], float (&l_run)[2],
                                                    float (&alpha)[2]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = kv0 + nt * 8 + 2 * tq + (e & 1);
      const int row = row0 + (e >> 1) * 8;
      float x = s[4 * nt + e] * scale_log2;
      if (edge && (col >= seq || (kCausal && col > row))) x = -INFINITY;
      s[4 * nt + e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // a row's values live in the 4 lanes of one quad
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m_run[r], mx[r]);
    base[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: exps stay 0 instead of NaN
    alpha[r] = exp2f(m_run[r] - base[r]);
    m_run[r] = m_new;
    l_run[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(s[4 * nt + e] - base[e >> 1]);
      s[4 * nt + e] = p;
      l_run[e >> 1] += p;
    }
}

// O's NI n-tiles of the two rows scaled by alpha (the online softmax's correction).
template <int NI>
__device__ __forceinline__ void rescale_rows(float* o, const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < NI; ++i) {
    o[4 * i + 0] *= alpha[0], o[4 * i + 1] *= alpha[0];
    o[4 * i + 2] *= alpha[1], o[4 * i + 3] *= alpha[1];
  }
}

// The rows' final O = o / l in E at `orow(row)` (NI n-tiles of 8 columns) and lse (natural log) at
// lse_row[row], for rows below seq.
template <typename E, int NI, typename ORow>
__device__ __forceinline__ void write_out_lse(const float* o, const float (&l_run)[2], const float (&m_run)[2],
                                              int row0, int tq, int seq, ORow orow, float* lse_row) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + r * 8;
    if (row < seq) {
      E* out = orow(row);
#pragma unroll
      for (int i = 0; i < NI; ++i)
        *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * tq) = pack2<E>(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
      if (tq == 0) lse_row[row] = (m_run[r] + log2f(l)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pieces the backward kernels share (v1, v2, v3).

// Iteration `it` of a backward CTA handles query head h and query tile mt. Atomic mode: heads outer,
// tiles upwards from the first one seeing the CTA's keys. Ordered mode: tiles downwards from the
// last, heads inner, so (h, mt) comes at the same `it` in every key tile's CTA.
__device__ __forceinline__ void bwd_coords(bool ordered, int it, int hpc, int per_head, int h_first, int nq,
                                           int m_first, int& h, int& mt) {
  if (ordered) {
    h = h_first + it % hpc;
    mt = nq - 1 - it / hpc;
  } else {
    h = h_first + it / per_head;
    mt = m_first + it % per_head;
  }
}

// How a key tile's dQ part of one query tile reaches global memory (v2, v3): 0: add (RED), 1: store
// the fp32 part (the first of several, ordered mode), 2: store dQ (the only one), 3: load the sum,
// add, store dQ (the last).
__device__ __forceinline__ int dq_mode(bool ordered, bool first, bool last) {
  return !ordered ? 0 : first ? (last ? 2 : 1) : (last ? 3 : 0);
}

// c: one 16x8 C fragment (rows g, g+8; columns 2t, 2t+1). Lane pair (2i, 2i+1): the even lane sends
// its row g+8 pair and keeps row g, the odd lane sends its row g pair and keeps row g+8; each then
// holds 4 consecutive columns (2·(t & 2) ..) of one row (g, or g + 8 for the odd lane).
__device__ __forceinline__ float4 lane_pair_row4(const float* c, bool odd) {
  const float r0 = __shfl_xor_sync(0xffffffffu, odd ? c[0] : c[2], 1);
  const float r1 = __shfl_xor_sync(0xffffffffu, odd ? c[1] : c[3], 1);
  return odd ? make_float4(r0, r1, c[2], c[3]) : make_float4(c[0], c[1], r0, r1);
}

// Four consecutive dQ elements at offset o by dq_mode (dqa: the fp32 sum, dqo: dQ in E, scaled).
template <typename E>
__device__ __forceinline__ void dq_write4(int mode, float* dqa, E* dqo, int64_t o, float4 val, float scale) {
  if (mode == 0) {
    atomic_add4(dqa + o, val);
  } else if (mode == 1) {
    *reinterpret_cast<float4*>(dqa + o) = val;
  } else {
    float4 s = val;
    if (mode == 3) {  // L2 load (.cg): the sum was written by other SMs
      const float4 prev = __ldcg(reinterpret_cast<const float4*>(dqa + o));
      s = make_float4(prev.x + val.x, prev.y + val.y, prev.z + val.z, prev.w + val.w);
    }
    *reinterpret_cast<uint2*>(dqo + o) =
        make_uint2(pack2<E>(scale * s.x, scale * s.y), pack2<E>(scale * s.z, scale * s.w));
  }
}

// Two adjacent dK and dV elements at offset o: fp32 adds into the split scratch (dk32 != nullptr) or
// stores in E.
template <typename E>
__device__ __forceinline__ void dkdv_write2(float* dk32, float* dv32, E* dk, E* dv, int64_t o, float k0, float k1,
                                            float v0, float v1) {
  if (dk32 != nullptr) {
    atomic_add2(dk32 + o, k0, k1);
    atomic_add2(dv32 + o, v0, v1);
  } else {
    *reinterpret_cast<uint32_t*>(dk + o) = pack2<E>(k0, k1);
    *reinterpret_cast<uint32_t*>(dv + o) = pack2<E>(v0, v1);
  }
}

// ---------------------------------------------------------------------------------------------
// Turn counters of the deterministic ("ordered") backward, see ops/cuda/flash_attention_backward.cu.

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// spin_turn: the calling thread spins until *ctr reaches `turn`. Its acquire load makes the adds that
// the previous contributor fenced before incrementing visible to it. wait_turn: thread 0 does; the
// caller's next __syncthreads() extends that ordering to the whole CTA before anyone adds.
// After 20 s both trap (a deadlock). kReport: print the diagnosis first. printf is a function call,
// and a call anywhere in a kernel makes ptxas serialise every wgmma of that kernel (warning C7510:
// each wgmma waits for the previous one), so the wgmma kernels (v3) trap without the message.
template <bool kReport = true>
__device__ __forceinline__ void spin_turn(const int* ctr, int turn) {
  uint64_t t0 = 0;
  for (unsigned polls = 1; load_acquire(ctr) < turn; ++polls) {
    __nanosleep(32);
    if ((polls & 4095u) == 0) {
      const uint64_t now = globaltimer_ns();
      if (t0 == 0) {
        t0 = now;
      } else if (now - t0 > 20000000000ull) {
        if constexpr (kReport)
          printf("flash_attention_backward: block (%d,%d,%d) waited 20 s for turn %d (counter %d): deadlock\n",
                 blockIdx.x, blockIdx.y, blockIdx.z, turn, load_acquire(ctr));
        __trap();
      }
    }
  }
}
template <bool kReport = true>
__device__ __forceinline__ void wait_turn(const int* ctr, int turn) {
  if (threadIdx.x == 0) spin_turn<kReport>(ctr, turn);
}

// This thread's earlier global writes/adds are performed GPU-wide before anything it does after.
// fence.acq_rel, not __threadfence()'s fence.sc: a release pattern needs no sequential consistency.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// Thread 0 hands the turn on (called after a barrier that follows every thread's fence).
__device__ __forceinline__ void release_increment(int* ctr) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(ctr) : "memory");
}

// Thread 0 hands the turn on for the whole CTA, after a __syncthreads() that follows every thread's
// adds: the CTA-wide release of CUTLASS's GenericBarrier::arrive_inc (and FlashAttention-3's
// deterministic backward). The barrier orders the other threads' adds before thread 0's fence, and a
// gpu-scope fence is cumulative over what precedes it in causality order, so a successor that
// acquires the counter sees every add. `fenced`: the threads already fenced their own adds (then the
// release increment alone suffices).
__device__ __forceinline__ void cta_release_increment(int* ctr, bool fenced) {
  if (!fenced) fence_acq_rel_gpu();
  release_increment(ctr);
}

// Every thread's adds are made visible GPU-wide (its own fence: they drain to L2) before thread 0
// hands the turn on with a release increment (cumulative over the CTA through the barrier; the
// per-thread fences make that independent of barrier cumulativity).
__device__ __forceinline__ void pass_turn(int* ctr) {
  fence_acq_rel_gpu();
  __syncthreads();
  if (threadIdx.x == 0) release_increment(ctr);
}

// The split dK/dV of the ordered mode (v2, v3): the splits of one (b, kv head, key tile) add their
// parts in ascending split order. Every thread calls begin before its adds and end after them.
template <bool kReport = true>
__device__ __forceinline__ void kv_turn_begin(const int* kv_turn, int split) {
  if (kv_turn != nullptr && split > 0) {
    wait_turn<kReport>(kv_turn, split);
    __syncthreads();
  }
}
__device__ __forceinline__ void kv_turn_end(int* kv_turn, int split, int splits, bool thread_fences) {
  if (kv_turn != nullptr && split + 1 < splits) {
    if (thread_fences) {
      pass_turn(kv_turn);
    } else {
      __syncthreads();
      if (threadIdx.x == 0) cta_release_increment(kv_turn, false);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host helpers

// Calls f(E{}, integral_constant<int, D>{}, bool_constant<causal>{}) for the runtime choices.
template <typename F>
inline void flash_dispatch(DType dt, int64_t D, bool causal, F&& f) {
  auto by_causal = [&](auto e, auto d) {
    if (causal)
      f(e, d, std::true_type{});
    else
      f(e, d, std::false_type{});
  };
  auto by_d = [&](auto e) {
    if (D == 64)
      by_causal(e, std::integral_constant<int, 64>{});
    else
      by_causal(e, std::integral_constant<int, 128>{});
  };
  if (dt == DType::bf16)
    by_d(__nv_bfloat16{});
  else
    by_d(__half{});
}

// A process-wide kernel choice (variant, chunking): 0 means not decided yet, then the first query
// stores from_env() (the environment's choice) unless an explicit set got there first.
template <typename F>
inline int setting_or_env(std::atomic<int>& setting, F&& from_env) {
  int v = setting.load();
  if (v == 0) {
    setting.compare_exchange_strong(v, from_env());  // loses only to a concurrent explicit set
    v = setting.load();
  }
  return v;
}

inline bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data()) % 16 == 0; }

}  // namespace omniq::cuda::flash
