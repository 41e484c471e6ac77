// Device helpers of the LET-fused fake-quant backward's tile kernel (fake_quant_let_backward.cu, whose
// header comment describes the design): the per-row state in shared memory, step B's element loop,
// cp.async and L2 prefetch wrappers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ops/cuda/fake_quant_common.cuh"

namespace omniq::cuda::let_tile {

using namespace fq;

constexpr int kRows = 8;              // rows per tile = warps per block
constexpr int kThreads = 32 * kRows;  // 256
constexpr int kV = 8;                 // elements per vector: the op requires in % 8 == 0
constexpr int kNoRow = 0, kDivide = 1, kMultiply = 2;

template <int kMode>
__device__ __forceinline__ float let_u(float v, float r) {
  if constexpr (kMode == kDivide) return __fdiv_rn(v, r);
  else if constexpr (kMode == kMultiply) return __fmul_rn(v, r);
  else return v;
}

// What step B needs of a row (two 16-byte shared loads).
struct alignas(16) RowQ {
  float xmax, xmin, scale, rcp;  // rcp = __frcp_rn(scale)
  float lo, hi, r, dvf;          // STE bounds; row scale (1 without); dv = du · dvf (1/r, r or 1)
};

struct alignas(16) RowInfo {
  RowQ q;
  GroupState s;      // step C (group_grad)
  int fast;          // fast_div_ok for the row
  int nmax, nmin;    // elements equal to the max / min (step B, integer atomics)
  float smax, smin;  // step C → D: the max / min share · dvf
};

// 16-byte shared memory loads of a thread's column scales (elements 0–3 and 4–7 of vector v kept in
// two arrays, so a warp's accesses are consecutive and conflict-free).
struct ColScales {
  const Pack<float, 4>* lo;
  const Pack<float, 4>* hi;
  __device__ __forceinline__ void get(int v, float (&c)[kV]) const {
    const Pack<float, 4> a = lo[v], b = hi[v];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      c[i] = a.v[i];
      c[i + 4] = b.v[i];
    }
  }
};

// Step B's element loop over a thread's vectors of one row: ds = Σ dy·∂x̂/∂scale, dr = Σ du·u
// (du = dy·STE: the shares come later), dc += du·dvf·w, and the thread's max/min of u.
template <int kMode, bool kFast, typename TX, typename TG, int kItems>
__device__ __forceinline__ void row_body(const Pack<TX, kV>* xs, const Pack<TG, kV>* gs, const RowQ& q,
                                         const ColScales& cs, int tid, int nvec, float (&cacc)[kItems][kV],
                                         float& ds, float& dr, float& mx, float& mn) {
  GroupState s{};
  s.scale = q.scale;  // all that elem_grad reads of the state
  const SteBounds B{q.lo, q.hi};
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int v = tid + k * kThreads;
    if (v >= nvec) continue;
    float c[kV];
    cs.get(v, c);
    const Pack<TX, kV> x = xs[k * kThreads];
    const Pack<TG, kV> g = gs[k * kThreads];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const float wf = ld_f32(x.v[i]);
      const float u = let_u<kMode>(__fmul_rn(wf, c[i]), q.r);
      const ElemGrad e = elem_grad<kFast>(u, s, q.rcp, B);
      const float gf = ld_f32(g.v[i]);
      ds = __fmaf_rn(gf, e.dscale_term, ds);
      float d = e.in ? gf : 0.0f;
      if constexpr (kMode != kNoRow) {
        dr = __fmaf_rn(d, u, dr);
        d = __fmul_rn(d, q.dvf);
      }
      cacc[k][i] = __fmaf_rn(d, wf, cacc[k][i]);
      mx = fmaxf(mx, u);
      mn = fminf(mn, u);
    }
  }
}

// Bytes of one stage of step B's rows (host and device agree).
template <typename TX, typename TG, int kItems>
__host__ __device__ constexpr size_t stage_bytes() {
  return static_cast<size_t>(kThreads) * kItems * (sizeof(Pack<TX, kV>) + sizeof(Pack<TG, kV>));
}

// cp.async of one pack (16-byte chunks: a pack is 16 or 32 bytes), global → shared, L2 only.
template <typename P>
__device__ __forceinline__ void copy_async(P* dst, const P* src) {
  static_assert(sizeof(P) % 16 == 0, "16-byte cp.async chunks");
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const char* g = reinterpret_cast<const char*>(src);
#pragma unroll
  for (int o = 0; o < static_cast<int>(sizeof(P)); o += 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d + o), "l"(g + o) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace omniq::cuda::let_tile
