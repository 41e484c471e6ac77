// The per-group device code shared by the CUDA fake-quant kernels (fake_quant.cu: forward and the
// v1/v2 backward; fake_quant_backward_stream.cu: the streaming backward without dx), and the launch
// geometry they all use (group_launch). What the kernels compute, the layout of teams and the bit
// equality with the CPU are described at the top of fake_quant.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "ops/cuda/fake_quant_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda::fq {

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

// ==== launch geometry ========================================================================

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
inline GroupLaunch group_launch(int64_t groups, int64_t n, DType xdt,
                                std::initializer_list<std::pair<const void*, DType>> ptrs, bool backward,
                                const char* op, int lane_vecs = 4) {
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

// The streaming backward without dx (fake_quant_backward_stream.cu) for 16-bit x in 16-byte vectors
// (TX = __half or __nv_bfloat16; TG = float, __half or __nv_bfloat16). Returns false where it does
// not apply; the caller then runs fake_quant_backward_kernel.
template <typename TX, typename TG>
bool launch_backward_stream(const GroupLaunch& l, const TG* dy, const TX* x, const float* gp, const float* bp,
                            float* dgp, float* dbp, int64_t groups, int n, const Levels& L, CudaContext& ctx);

}  // namespace omniq::cuda::fq
