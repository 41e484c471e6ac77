// CUDA fake quantizers: fused weight (LWC) / per-token activation quantizer forward and backward,
// and the |s| floor of LET. Semantics and gradient rules in ops/fake_quant.h; the CPU twin is
// ops/cpu/fake_quant.cpp and x̂ must match it bit for bit.
//
// Bit equality: every step of the quantizer uses the explicitly rounded intrinsics (__fdiv_rn,
// __fmul_rn, __fadd_rn, __fsub_rn) so nvcc can neither contract a multiply-add into an FMA nor use
// an approximate division; σ(γ) is computed in fp64 and rounded once, like the CPU. The output
// dtype only rounds the fp32 x̂ once (RNE), exactly as a later f32 → bf16 cast did.
//
// Dtypes: data x (w) f32 | bf16 | f16; the forward's output y and the backward's dy may each have
// another of these dtypes (ŵ f32 → bf16 for the bf16 GEMMs; dy f32 straight from the dW GEMM), so
// no conversion kernel runs before or after; dx has x's dtype.
//
// Layout: groups are contiguous runs of `n` elements (a weight [out, in] with group g is
// [out·in/g, g]; an activation [..., C] is rows × C); one *team* of threads owns one group: short
// groups (≤ 256 vectors of 16 bytes of x: g32..g128, head_dim) 2..32 lanes of a warp (≈4–8 vectors a
// lane, shuffles only); long groups (per-channel rows of 4096..11008, per-token rows) a block of
// 128/256/512 threads (≤ kItems vectors a thread, shuffles + one trip through shared memory).
// One pass over memory: every thread loads its vectors of x (and dy) into registers first, so all
// its loads are in flight at once, reduces min/max (and dscale), and writes y (or dx, dγ, dβ) from
// the registers. Only rows longer than 512·kItems vectors (> 16384 f32) re-read the excess (L1/L2).
// Napkin math (H100, 3.35 TB/s), LLaMA-7B block = 202 M weights, f16 weights, bf16 ŵ and dŵ:
//   forward f16 → bf16: 2 + 2 bytes/weight = 0.81 GB ≈ 0.24 ms;
//   backward dy bf16, dγ/dβ only: 2 + 2 bytes/weight = 0.81 GB ≈ 0.24 ms (dw adds 2 bytes/weight).
// At 4 bytes per element the SM budget is ≈ 40 thread-instructions per element (132 SMs × 4 × 32
// lanes × 1.98 GHz / 837 G elements/s), and v1 spent ≈ 23 (forward) / ≈ 30 (backward) of them, a
// third in __fdiv_rn: with the latency of one round of loads per group on top, v1 ran at 47–66% of
// DRAM peak. v2 (the default; OMNIQ_FQ_V1=1 runs v1) keeps the layout and gives the same ŵ bits:
//   * u = x / scale from a per-group reciprocal and two FMA corrections (div_by_scale, exact; the
//     group falls back to __fdiv_rn where the proof's preconditions fail), ≈ 5 instead of ≈ 12;
//   * the backward's STE decision and ∂x̂/∂scale from one clamp (elem_grad), dscale as an FMA chain;
//   * the backward without dx (weight-only LWC) is its own instantiation, capped at 80 registers
//     for f16 weights: three 256-thread blocks per SM instead of two (more loads in flight);
//   * the forward's warp teams aim at 8 vectors per lane (g128 of f16: 2 lanes, not 4);
//   * with dx, the max/min tie counts only in threads that hold the group's max/min.
// v2.1 (the default for 16-bit weights; OMNIQ_FQ_V2_OLD=1 runs the first v2 kernel): the backward
// without dx as a persistent grid-stride kernel that keeps the next tile's w and dy in flight
// (cp.async into shared memory) while it reduces the current one; same bits as v2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/cuda/fake_quant_common.cuh"
#include "ops/fake_quant.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace fq;  // the shared building blocks (fake_quant_common.cuh)

// ==== CUDA kernels ===========================================================================


// Visits a thread's vectors of a group: cached(j, c) for the ones in registers (j < kItems, fully
// unrolled so xr[j] stays in registers), extra(c) for the excess of very long groups.
template <int kItems, typename Cached, typename Extra>
__device__ __forceinline__ void sweep(int c0, int step, int n, Cached&& cached, Extra&& extra) {
#pragma unroll
  for (int j = 0; j < kItems; ++j)
    if (c0 + j * step < n) cached(j, c0 + j * step);
  for (int c = c0 + kItems * step; c < n; c += step) extra(c);
}

// The group's (max, −min) over the team; −min as a max makes it one reduction for both.
template <typename T, int N>
__device__ __forceinline__ void min_max_of(const Pack<T, N>& pk, float (&r)[2]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float v = ld_f32(pk.v[i]);
    r[0] = fmaxf(r[0], v);
    r[1] = fmaxf(r[1], -v);
  }
}

// Where a thread's vectors of its group lie: vector j at element c0 + j·step (coalesced).
struct Tile {
  TeamPos tp;
  bool valid;  // only a warp-team tail can be invalid; it must still take part in the shuffles
  int64_t k, off;
  int c0, step;
};

template <int kVec>
__device__ __forceinline__ Tile make_tile(int team, int64_t groups, int n, int64_t tile) {
  const TeamPos tp = team_pos(team, tile);
  const bool valid = tp.group < groups;
  const int64_t k = valid ? tp.group : 0;
  return {tp, valid, k, k * static_cast<int64_t>(n), tp.lane * kVec, tp.size * kVec};
}

// Min/max of the group (registers first, the excess re-read), σ(γ), σ(β), and the group state.
// own = the thread's own (max, −min) before the team reduction.
// xr: the thread's cached vectors, xr[j] for j < kItems (a register array, or a view of shared memory).
// a, b: σ(γ), σ(β) of the group.
template <int kItems, typename TX, int kVec, typename XR>
__device__ __forceinline__ GroupState tile_state_ab(const Tile& t, const TX* xg, const XR& xr, int n, float a, float b,
                                                    const Levels& L, float* smem, float (&own)[2]) {
  float r[2] = {-INFINITY, -INFINITY};
  if (t.valid)
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { min_max_of(xr[j], r); },
                  [&](int c) { min_max_of(load_pack<TX, kVec>(xg + c), r); });
  own[0] = r[0];
  own[1] = r[1];
  team_reduce<2>(r, [](float p, float q) { return fmaxf(p, q); }, t.tp, smem);
  return group_state(r[0], -r[1], a, b, L);  // garbage but harmless for an invalid tail
}

template <int kItems, typename TX, int kVec>
__device__ __forceinline__ GroupState tile_state(const Tile& t, const TX* xg, const Pack<TX, kVec> (&xr)[kItems],
                                                 int n, const float* gamma, const float* beta, const Levels& L,
                                                 float* smem, float (&own)[2]) {
  float a, b;
  lwc_sigmoids(gamma, beta, t.k, t.tp, a, b);  // overlaps the loads in flight
  return tile_state_ab<kItems, TX, kVec>(t, xg, xr, n, a, b, L, smem, own);
}

// y = x̂ for every group (groups = numel / n); x and y may have different dtypes. kV2: the division by
// the scale through div_by_scale (fake_quant_common.cuh), same bits; else v1 (__fdiv_rn).
template <typename TX, typename TY, int kVec, bool kV2>
__global__ void __launch_bounds__(kMaxBlock) fake_quant_forward_kernel(const TX* __restrict__ x, TY* __restrict__ y,
                                                                      const float* __restrict__ gamma,
                                                                      const float* __restrict__ beta, int64_t groups,
                                                                      int n, int team, Levels L) {
  constexpr int kItems = cache_items<kVec, false>();
  __shared__ float smem[32 * 2];
  const Tile t = make_tile<kVec>(team, groups, n, blockIdx.x);
  const TX* xg = x + t.off;
  Pack<TX, kVec> xr[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j)  // issue every load before using any
    if (t.valid && t.c0 + j * t.step < n) xr[j] = load_pack<TX, kVec>(xg + t.c0 + j * t.step);
  float own[2];
  const GroupState s = tile_state<kItems>(t, xg, xr, n, gamma, beta, L, smem, own);
  if (!t.valid) return;  // no shuffle follows

  TY* yg = y + t.off;
  if constexpr (kV2) {
    const float rcp = __frcp_rn(s.scale);
    auto body = [&](auto fast_c) {  // the group's elements with one division method
      constexpr bool kFast = decltype(fast_c)::value;
      auto emit = [&](const Pack<TX, kVec>& pk, int c) {
        float v[kVec], o[kVec];
        unpack(pk, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = fake_quant_elem<kFast>(v[i], s, rcp, L);
        store_pack<TY, kVec>(yg + c, o);
      };
      sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], c); },
                    [&](int c) { emit(load_pack<TX, kVec>(xg + c), c); });
    };
    if (fast_div_ok(s.xmax, s.xmin, rcp)) body(std::true_type{});
    else body(std::false_type{});
    return;
  }
  auto emit = [&](const Pack<TX, kVec>& pk, int c) {
    float v[kVec], o[kVec];
    unpack(pk, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = dequantize(quantize(v[i], s, L), s);
    store_pack<TY, kVec>(yg + c, o);
  };
  sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], c); },
                [&](int c) { emit(load_pack<TX, kVec>(xg + c), c); });
}

// Register cap of the v2 backward without dx (the weight-only LWC step). 80 lets three 256-thread
// blocks share an SM (24 warps: 50% more loads in flight than at the 87–121 registers it takes
// uncapped, which fit two). Applied where ptxas -v shows at most 8 bytes of spill loads under the
// cap (f16 weights, or f16 dy; the training step's f16 w / bf16 dy: 2 bytes stored, 8 loaded); the
// others (bf16/f32 w with bf16/f32 dy) would spill 112–180 bytes, so they keep v1's 128.
template <typename TX, typename TG>
constexpr int v2_no_dx_max_regs() {
  return std::is_same_v<TX, __half> || std::is_same_v<TG, __half> ? 80 : 128;
}

// v2 of the backward from the group state on (fake_quant_backward_kernel<..., true>): the same
// values as v1 up to the fp32 order of the dscale sum (a chain of FMAs here), from fewer
// instructions per element (≈ 16 instead of ≈ 30):
//  * u = x / scale by div_by_scale (the group falls back to __fdiv_rn where fast_div_ok fails), the
//    STE decision and ∂x̂/∂scale from one clamp and one compare (elem_grad);
//  * the max/min tie counts (only with dx) are taken only by threads whose own max/min is the
//    group's: an element can equal the group's max only where its thread's max does. (A warp still
//    runs the count when one of its lanes needs it, so this pays off for block teams: long rows.)
template <int kItems, bool kDx, typename TX, typename TG, int kVec, typename XR, typename GR>
__device__ __forceinline__ void fake_quant_backward_v2(const Tile& t, const GroupState& s, const float (&own)[2],
                                                       const TX* xg, const TG* gg, const XR& xr, const GR& gr, TX* dx,
                                                       const float* gamma,
                                                       float* dgamma, float* dbeta, int n, const Levels& L,
                                                       float* smem) {
  constexpr bool want_dx = kDx;  // a template parameter: without dx no data stays live past the sums
  const float rcp = __frcp_rn(s.scale);
  const SteBounds B = ste_bounds(s, L);
  float acc[3] = {0.0f, 0.0f, 0.0f};  // dscale, #(x == xmax), #(x == xmin)
  static_assert(!kDx || kItems * kVec <= 32, "the STE mask is one 32-bit word");
  uint32_t in_mask = 0;  // bit j·kVec + i: the STE decision of cached element (j, i), for the dx pass
  auto body = [&](auto fast_c) {
    constexpr bool kFast = decltype(fast_c)::value;
    auto accumulate = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp, int j) {
      float v[kVec], g[kVec];
      unpack(xp, v);
      unpack(gp, g);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const ElemGrad e = elem_grad<kFast>(v[i], s, rcp, B);
        acc[0] = __fmaf_rn(g[i], e.dscale_term, acc[0]);
        if (want_dx && j >= 0) in_mask |= e.in ? (1u << (j * kVec + i)) : 0u;
      }
    };
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { accumulate(xr[j], gr[j], j); },
                  [&](int c) { accumulate(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c), -1); });
  };
  if (t.valid) {
    if (fast_div_ok(s.xmax, s.xmin, rcp)) body(std::true_type{});
    else body(std::false_type{});
  }
  auto sum = [](float p, float q) { return p + q; };
  if (!want_dx) {
    team_reduce<1>(acc, sum, t.tp, smem);
  } else {
    if (t.valid && (own[0] == s.xmax || own[1] == -s.xmin)) {
      auto count = [&](const Pack<TX, kVec>& xp) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float v = ld_f32(xp.v[i]);
          acc[1] += v == s.xmax ? 1.0f : 0.0f;
          acc[2] += v == s.xmin ? 1.0f : 0.0f;
        }
      };
      sweep<kItems>(t.c0, t.step, n, [&](int j, int) { count(xr[j]); },
                    [&](int c) { count(load_pack<TX, kVec>(xg + c)); });
    }
    team_reduce<3>(acc, sum, t.tp, smem);
  }
  if (!t.valid) return;

  const GroupGrad grad = group_grad(s, acc[0], L, gamma != nullptr);
  if (gamma && t.tp.lane == 0) {
    dgamma[t.k] = grad.dgamma;
    dbeta[t.k] = grad.dbeta;
  }
  if (!want_dx) return;
  const float share_max = grad.dxmax / acc[1], share_min = grad.dxmin / acc[2];
  TX* dxg = dx + t.off;
  auto emit = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp, int c, int j) {
    float v[kVec], g[kVec], o[kVec];
    unpack(xp, v);
    unpack(gp, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const bool in = j >= 0 ? ((in_mask >> (j * kVec + i)) & 1u) != 0 : elem_grad<false>(v[i], s, rcp, B).in;
      float d = in ? g[i] : 0.0f;
      d = __fadd_rn(d, v[i] == s.xmax ? share_max : 0.0f);
      d = __fadd_rn(d, v[i] == s.xmin ? share_min : 0.0f);
      o[i] = d;
    }
    store_pack<TX, kVec>(dxg + c, o);
  };
  sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], gr[j], c, j); },
                [&](int c) { emit(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c), c, -1); });
}

// Per group: dscale = Σ dy·∂x̂/∂scale (and, when dx is wanted, the tie counts of max/min) as team
// sums, then dγ/dβ and, when dx != nullptr, dx = dy·in + dxmax/#argmax·[x = xmax] + dxmin/#argmin·
// [x = xmin]. dy may have another dtype than x; dx has x's. kMode: 0 = v1, 1 = v2 without dx (dx must
// be null), 2 = v2 with dx (fake_quant_backward_v2 above).
template <typename TX, typename TG, int kVec, int kMode>
__global__ void __launch_bounds__(kMaxBlock) __maxnreg__((kMode == 1 ? v2_no_dx_max_regs<TX, TG>() : 128))
    fake_quant_backward_kernel(const TG* __restrict__ dy, const TX* __restrict__ x, TX* __restrict__ dx,
                               const float* __restrict__ gamma, const float* __restrict__ beta,
                               float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t groups, int n, int team,
                               Levels L) {
  constexpr int kItems = cache_items<kVec, true>();
  __shared__ float smem[32 * 3];
  const Tile t = make_tile<kVec>(team, groups, n, blockIdx.x);
  const TX* xg = x + t.off;
  const TG* gg = dy + t.off;
  Pack<TX, kVec> xr[kItems];
  Pack<TG, kVec> gr[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int c = t.c0 + j * t.step;
    if (t.valid && c < n) {
      xr[j] = load_pack<TX, kVec>(xg + c);
      gr[j] = load_pack<TG, kVec>(gg + c);
    }
  }
  float own[2];
  const GroupState s = tile_state<kItems>(t, xg, xr, n, gamma, beta, L, smem, own);
  if constexpr (kMode != 0) {
    fake_quant_backward_v2<kItems, kMode == 2, TX, TG, kVec>(t, s, own, xg, gg, xr, gr, dx, gamma, dgamma, dbeta, n,
                                                             L, smem);
    return;
  }

  const bool want_dx = dx != nullptr;  // uniform over the launch: every thread takes the same branches
  float acc[3] = {0.0f, 0.0f, 0.0f};   // dscale, #(x == xmax), #(x == xmin) (exact up to 2^24)
  // The STE decision of each cached element, one bit each, so the dx pass needs no second division
  // (the quantizer is most of the instructions of this memory-bound kernel).
  static_assert(kItems * kVec <= 32, "the STE mask is one 32-bit word");
  uint32_t in_mask = 0;
  auto accumulate = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp, int j) {
    float v[kVec], g[kVec];
    unpack(xp, v);
    unpack(gp, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const ElemQ e = quantize(v[i], s, L);
      acc[0] += g[i] * (e.in ? e.t - e.u : e.q - s.zp);
      if (want_dx) {
        acc[1] += v[i] == s.xmax ? 1.0f : 0.0f;
        acc[2] += v[i] == s.xmin ? 1.0f : 0.0f;
        if (j >= 0) in_mask |= e.in ? (1u << (j * kVec + i)) : 0u;
      }
    }
  };
  if (t.valid)
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { accumulate(xr[j], gr[j], j); },
                  [&](int c) { accumulate(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c), -1); });
  auto sum = [](float p, float q) { return p + q; };
  if (want_dx) team_reduce<3>(acc, sum, t.tp, smem);
  else team_reduce<1>(acc, sum, t.tp, smem);
  if (!t.valid) return;

  const GroupGrad grad = group_grad(s, acc[0], L, gamma != nullptr);
  if (gamma && t.tp.lane == 0) {
    dgamma[t.k] = grad.dgamma;
    dbeta[t.k] = grad.dbeta;
  }
  if (!want_dx) return;
  const float share_max = grad.dxmax / acc[1], share_min = grad.dxmin / acc[2];
  TX* dxg = dx + t.off;
  auto emit = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp, int c, int j) {
    float v[kVec], g[kVec], o[kVec];
    unpack(xp, v);
    unpack(gp, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const bool in = j >= 0 ? ((in_mask >> (j * kVec + i)) & 1u) != 0 : quantize(v[i], s, L).in;
      float d = in ? g[i] : 0.0f;
      d = __fadd_rn(d, v[i] == s.xmax ? share_max : 0.0f);
      d = __fadd_rn(d, v[i] == s.xmin ? share_min : 0.0f);
      o[i] = d;
    }
    store_pack<TX, kVec>(dxg + c, o);
  };
  sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], gr[j], c, j); },
                [&](int c) { emit(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c), c, -1); });
}

// ---- v2.1: the backward without dx as a streaming kernel (default; OMNIQ_FQ_V2_OLD=1 = the above) ----
//
// Why: the kernel above loads a thread's vectors into registers, computes, and exits. While a block
// computes (the team reductions, the fp64 σ, ≈ 16 instructions per element) it has no load in flight,
// so an SM alternates bursts of loads with bursts of math and reached only 55–64% of DRAM peak (g128)
// and 38% for per-channel rows of 11008 (512-thread blocks at 80 registers: one block per SM).
// Here each block loops over tiles (a tile = the groups one launch block of the kernel above owns:
// blockDim/team groups for warp teams, one row for block teams) and keeps kStages tiles in shared
// memory: cp.async puts tile i + kStages − 1 in flight before tile i is computed. Every thread copies
// exactly the vectors (and the σ parameter) it later reads itself, so completion needs only its own
// cp.async.wait_group: no barrier between the copies and the math, and warps run independently.
// The math is the same device code (tile_state_ab, fake_quant_backward_v2) in the same order with the
// same team mapping and block size: dγ/dβ are bitwise those of the kernels above (with or without
// dx). Block teams are capped at 64 registers (kBlockTeam), so two 512-thread blocks (rows of
// 1025..2048 vectors: 11008, 13824) share an SM, where the kernel above fits one at 80.
// Smem layout of a stage: x packs [cap], dy packs [cap], the lane's raw γ|β [blockDim]; thread t's
// vector j sits at slot j·blockDim + t (consecutive threads, consecutive 16 bytes: conflict-free; for
// a block team the slot is the vector's index in the row).
template <typename T, int N>
struct SmemPacks {  // a thread's vectors in a stage, read on use (keeps registers for the math)
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

// Byte size of one stage (host and device agree): cap packs of x and of dy, blockDim floats, 16-aligned.
template <typename TX, typename TG, int kVec>
__host__ __device__ constexpr size_t stream_stage_bytes(int cap, int block) {
  const size_t bytes = static_cast<size_t>(cap) * (sizeof(Pack<TX, kVec>) + sizeof(Pack<TG, kVec>)) + 4u * block;
  return (bytes + 15u) & ~size_t{15};
}

// team > 0: warp teams, tile = blockDim/team groups; team == 0: one group (row) per tile. The launcher
// guarantees n ≤ kItems·team·kVec (warp teams) or n ≤ kItems·blockDim·kVec (block teams): every
// vector is cached, the sweeps' re-read branch never runs.
template <typename TX, typename TG, int kVec, int kItems, int kStages, bool kBlockTeam>
__global__ void __maxnreg__(kBlockTeam ? 64 : 80)
    fake_quant_backward_stream_kernel(const TG* __restrict__ dy, const TX* __restrict__ x,
                                      const float* __restrict__ gamma, const float* __restrict__ beta,
                                      float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t groups, int n,
                                      int team, int cap, Levels L) {
  using PX = Pack<TX, kVec>;
  using PG = Pack<TG, kVec>;
  extern __shared__ __align__(16) unsigned char stages[];
  __shared__ float smem[32 * 2];  // block-team reductions
  const int tid = static_cast<int>(threadIdx.x), block = static_cast<int>(blockDim.x);
  const size_t stage_bytes = stream_stage_bytes<TX, TG, kVec>(cap, block);
  auto xs = [&](int st) { return reinterpret_cast<PX*>(stages + st * stage_bytes); };
  auto gs = [&](int st) { return reinterpret_cast<PG*>(stages + st * stage_bytes + cap * sizeof(PX)); };
  auto ps = [&](int st) {
    return reinterpret_cast<float*>(stages + st * stage_bytes + cap * (sizeof(PX) + sizeof(PG)));
  };
  const int64_t per_tile = team ? block / team : 1;
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  // Puts tile `tile` in flight into stage st; one commit group per call, empty past the end, so the
  // wait below always counts kStages − 1 newer groups.
  auto issue = [&](int64_t tile, int st) {
    if (tile < tiles) {
      const Tile t = make_tile<kVec>(team, groups, n, tile);
      if (gamma) copy_async(ps(st) + tid, ((tid & 1) ? beta : gamma) + t.k);  // t.k is valid even for a tail
      if (t.valid) {
        const TX* xg = x + t.off;
        const TG* gg = dy + t.off;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int c = t.c0 + j * t.step;
          if (c < n) {
            copy_async(xs(st) + j * block + tid, reinterpret_cast<const PX*>(xg + c));
            copy_async(gs(st) + j * block + tid, reinterpret_cast<const PG*>(gg + c));
          }
        }
      }
    }
    cp_async_commit();
  };
  int64_t tile = blockIdx.x;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(tile + st * static_cast<int64_t>(gridDim.x), st);
  for (int it = 0; tile < tiles; ++it, tile += gridDim.x) {  // uniform over the block: shuffles stay legal
    // The stage refilled here was read by this thread in the previous iteration, whose results (the
    // shuffles, the dγ store) depend on those reads: they completed before this is issued.
    issue(tile + (kStages - 1) * static_cast<int64_t>(gridDim.x), (it + kStages - 1) % kStages);
    cp_async_wait<kStages - 1>();
    const int st = it % kStages;
    const Tile t = make_tile<kVec>(team, groups, n, tile);
    const SmemPacks<TX, kVec> xr{xs(st) + tid, block};
    const SmemPacks<TG, kVec> gr{gs(st) + tid, block};
    float a = 1.0f, b = 1.0f;
    if (gamma) lwc_sigmoids_of(ps(st)[tid], t.tp, a, b);
    float own[2];
    const TX* xg = x + t.off;
    const GroupState s = tile_state_ab<kItems, TX, kVec>(t, xg, xr, n, a, b, L, smem, own);
    fake_quant_backward_v2<kItems, false, TX, TG, kVec>(t, s, own, xg, dy + t.off, xr, gr, static_cast<TX*>(nullptr),
                                                        gamma, dgamma, dbeta, n, L, smem);
  }
  cp_async_wait<0>();  // nothing may be in flight into shared memory when the block exits
}

// y = sign(s)·max(|s|, floor), sign(0) = +1 (NaN stays NaN).
template <typename T>
__global__ void abs_floor_kernel(const T* __restrict__ s, T* __restrict__ y, int64_t n, float floor) {
  for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) {
    float v = ld_f32(s[i]);
    if (fabsf(v) < floor) v = v < 0.0f ? -floor : floor;
    y[i] = st_as<T>(v);
  }
}

// ==== kernel launchers =======================================================================

constexpr int kTeamBlock = 256;  // threads per block when warp teams own the groups


struct GroupLaunch {
  int team;  // 2..32 lanes, or 0 = the whole block
  bool vec;  // kVec = 16 bytes of x per access; else one element
  dim3 grid, block;
};


// Vector accesses need the group length to be a multiple of the pack (16 bytes of x) and every
// pointer aligned for its own pack. Teams are sized so that each thread holds ≈4 (warp teams) or
// ≤ `items` (block teams) vectors.
// lane_vecs: the vectors a lane of a warp team aims for: 4 (teams of 4..32 lanes). The v2 forward
// can take 8 (OMNIQ_FQ_LANE_VECS=8: g128 of 16-bit weights in teams of 2 lanes, twice the loads in
// flight per thread), which measured slower on the H100 (64-74% vs 83% of DRAM peak), so 4 is the
// default. Teams keep ≥ 2 lanes (lwc_sigmoids computes σ(γ) and σ(β) on a pair of lanes).
GroupLaunch group_launch(int64_t groups, int64_t n, DType xdt, std::initializer_list<std::pair<const void*, DType>> ptrs,
                         bool backward, const char* op, int lane_vecs = 4) {
  OMNIQ_CHECK(n < (int64_t{1} << 30), "%s: group of %lld elements is too long", op, static_cast<long long>(n));
  GroupLaunch l;
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(xdt));
  l.vec = n % pack == 0;
  for (const auto& [p, dt] : ptrs) l.vec = l.vec && pack_ok(p, dt, pack);
  const int64_t nvec = l.vec ? n / pack : n;
  // Must agree with cache_items<kVec, backward>() of the kernel that will run.
  const int64_t items = backward && l.vec && pack == 8 ? 4 : 8;
  if (nvec <= 32 * items) {
    const int64_t want = (nvec + lane_vecs - 1) / lane_vecs;
    l.team = lane_vecs >= 8 ? 2 : 4;
    while (l.team < 32 && l.team < want) l.team <<= 1;
    l.block = dim3(kTeamBlock);
  } else {
    l.team = 0;
    int block = 128;
    while (block < kMaxBlock && nvec > static_cast<int64_t>(block) * items) block <<= 1;
    l.block = dim3(block);
  }
  const int64_t per_block = l.team ? kTeamBlock / l.team : 1;
  const int64_t blocks = (groups + per_block - 1) / per_block;
  OMNIQ_CHECK(blocks < (int64_t{1} << 31), "%s: %lld groups is more than one launch handles", op,
              static_cast<long long>(groups));
  l.grid = dim3(static_cast<unsigned int>(blocks));
  return l;
}


// Blocks of `kernel` per SM with `smem` bytes of dynamic shared memory, after allowing that much.
// Cached per (kernel, device, block, smem), so the calls happen once (the first, eager step) and
// never while a CUDA graph is being captured or per launch.
int stream_blocks_per_sm(const void* kernel, int device, int block, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, block, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int occ = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, block, smem));
  cache.emplace(key, occ);
  return occ;
}

// The streaming backward without dx (fake_quant_backward_stream_kernel) for 16-bit x in 16-byte
// vectors: warp teams and block teams as group_launch sizes them (≤ 4 vectors a thread), the latter for
// rows of up to 2048 vectors (16384 elements). Returns false where it
// does not apply (the caller runs the kernel above). The grid is at most what fits on the GPU at once
// (a persistent grid-stride loop), at most one block per tile.
template <typename TX, typename TG>
bool launch_backward_stream(const GroupLaunch& l, const TG* dy, const TX* x, const float* gp, const float* bp,
                            float* dgp, float* dbp, int64_t groups, int n, const Levels& L, CudaContext& ctx) {
  constexpr int kVec = 8;
  const int nvec = n / kVec;
  const bool warp_teams = l.team > 0;
  // group_launch's block and ≤ 4 vectors a thread (cache_items), so every thread sums the same
  // elements in the same order as the kernels above; longer rows re-read an excess there: not here.
  const int block = static_cast<int>(l.block.x);
  if (!warp_teams && nvec > 4 * block) return false;
  const int cap = warp_teams ? 4 * block : nvec;
  const int stages = fq_stream_stages();
  const size_t smem = stages * stream_stage_bytes<TX, TG, kVec>(cap, block);
  const int optin = ctx.prop.sharedMemPerBlockOptin, sms = ctx.prop.multiProcessorCount;
  if (smem > static_cast<size_t>(optin)) return false;
  auto go = [&](auto kernel) {
    const int occ = stream_blocks_per_sm(reinterpret_cast<const void*>(kernel), ctx.device, block, smem);
    if (occ < 1) return false;
    const int64_t per_tile = warp_teams ? block / l.team : 1;
    const int64_t tiles = (groups + per_tile - 1) / per_tile;
    if (tiles == 0) return true;  // nothing to do
    // Every block gets the same number of tiles (±1 for the last round): a grid of all resident slots
    // would leave most of them idle in a short last round while the others finish.
    const int64_t slots = static_cast<int64_t>(occ) * sms, rounds = (tiles + slots - 1) / slots;
    const int64_t grid = (tiles + rounds - 1) / rounds;
    kernel<<<static_cast<unsigned int>(grid), block, smem, ctx.stream>>>(dy, x, gp, bp, dgp, dbp, groups, n,
                                                                         warp_teams ? l.team : 0, cap, L);
    CUDA_CHECK_LAUNCH();
    return true;
  };
  if (warp_teams)
    return stages == 3 ? go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 3, false>)
                       : go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 2, false>);
  return stages == 3 ? go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 3, true>)
                     : go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 2, true>);
}

}  // namespace

void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y) {
  const char* op = "fake_quant_forward";
  const int64_t n = p.group, groups = x.numel() / n;
  const bool v1 = fq_v1_requested();
  const GroupLaunch l = group_launch(groups, n, x.dtype(), {{x.data(), x.dtype()}, {y.data(), y.dtype()}}, false, op,
                                     v1 ? 4 : fq_v2_forward_lane_vecs());
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(x.device());
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  dispatch_pair(x.dtype(), y.dtype(), l.vec, op, [&](auto xt, auto yt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TY = typename decltype(yt)::type;
    constexpr int kVec = decltype(vec_c)::value;
    auto kernel = v1 ? fake_quant_forward_kernel<TX, TY, kVec, false> : fake_quant_forward_kernel<TX, TY, kVec, true>;
    kernel<<<l.grid, l.block, 0, ctx.stream>>>(x.data_as<const TX>(), y.data_as<TY>(), gp, bp, groups,
                                               static_cast<int>(n), l.team, L);
    CUDA_CHECK_LAUNCH();
  });
}

void fake_quant_groups_backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma,
                                const Tensor* beta, Tensor* dx, Tensor* dgamma, Tensor* dbeta) {
  const char* op = "fake_quant_backward";
  const int64_t n = p.group, groups = x.numel() / n;
  const GroupLaunch l = group_launch(
      groups, n, x.dtype(),
      {{x.data(), x.dtype()}, {dy.data(), dy.dtype()}, {dx ? dx->data() : nullptr, x.dtype()}}, true, op);
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(x.device());
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  // dγ/dβ are written whenever LWC is on; the kernel needs somewhere to put them.
  OMNIQ_CHECK(!gamma || (dgamma && dbeta), "%s: LWC backward needs dgamma and dbeta outputs", op);
  OMNIQ_CHECK(!dx || dx->dtype() == x.dtype(), "%s: dx %s must have x's dtype %s", op, dx->str().c_str(),
              dtype_name(x.dtype()));
  float* dgp = dgamma ? dgamma->data_as<float>() : nullptr;
  float* dbp = dbeta ? dbeta->data_as<float>() : nullptr;
  const bool v1 = fq_v1_requested();
  dispatch_pair(x.dtype(), dy.dtype(), l.vec, op, [&](auto xt, auto gt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TG = typename decltype(gt)::type;
    constexpr int kVec = decltype(vec_c)::value;
    if constexpr (sizeof(TX) == 2 && kVec == 8) {
      if (!v1 && !dx && !fq_v2_old_requested() &&
          launch_backward_stream<TX, TG>(l, dy.data_as<const TG>(), x.data_as<const TX>(), gp, bp, dgp, dbp, groups,
                                         static_cast<int>(n), L, ctx))
        return;
    }
    auto kernel = v1   ? fake_quant_backward_kernel<TX, TG, kVec, 0>
                  : dx ? fake_quant_backward_kernel<TX, TG, kVec, 2>
                       : fake_quant_backward_kernel<TX, TG, kVec, 1>;
    kernel<<<l.grid, l.block, 0, ctx.stream>>>(dy.data_as<const TG>(), x.data_as<const TX>(),
                                               dx ? dx->data_as<TX>() : nullptr, gp, bp, dgp, dbp, groups,
                                               static_cast<int>(n), l.team, L);
    CUDA_CHECK_LAUNCH();
  });
}

void abs_floor_ste(const Tensor& s, float floor, Tensor& y) {
  const char* op = "abs_floor_ste";
  CudaContext& ctx = cuda_context(s.device());
  ew::dispatch_f32_bf16(s.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    abs_floor_kernel<T><<<ew::stride_grid(s.numel(), ctx), ew::kBlock, 0, ctx.stream>>>(
        s.data_as<const T>(), y.data_as<T>(), s.numel(), floor);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace omniq::cuda
