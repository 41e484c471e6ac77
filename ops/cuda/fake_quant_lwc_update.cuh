// Device code of the fused LWC step (ops/fake_quant_lwc_update.h), shared by its two kernels
// (fake_quant_lwc_update.cu: loads into registers, any dtype and group length;
// fake_quant_lwc_update_stream.cu: cp.async pipeline, 16-bit weights in 16-byte vectors).
//
// Per group (one team of threads, fake_quant_group.cuh's layout):
//   1. σ(γ), σ(β), min/max → the group state           (tile_state_ab: the forward's and backward's code)
//   2. dscale = Σ dy·∂x̂/∂scale as fake_quant_backward_v2 without dx sums it (same elements per
//      thread, same FMA chain, same team reduction) → dγ, dβ by group_grad: the unfused bits;
//   3. AdamW on the lane's parameter: even threads γ (with dγ, m_γ, v_γ, scalars row slot_gamma), odd
//      threads β — detail::adamw_update, the AdamW kernel's element update, so the same bits; the team's
//      first two lanes store γ', β', m, v (only this group's team reads or writes them);
//   4. σ(γ'), σ(β') → the new group state from the same max/min → ŵ' = fake_quant_elem of every
//      element (the forward kernel's code; x̂ does not depend on the order of anything), stored in
//      w_hat's dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "ops/adamw.h"
#include "ops/cuda/fake_quant_common.cuh"
#include "ops/cuda/fake_quant_group.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda::fq {

// The LWC parameters and their AdamW state (f32, one value per group), and the scalars rows.
struct LwcOptPtrs {
  float* gamma;
  float* beta;
  float* m_gamma;
  float* v_gamma;
  float* m_beta;
  float* v_beta;
  const omniq::detail::AdamWScalars* scalars;
  int slot_gamma, slot_beta;
};

// The thread's parameter of group k and its moments: γ for even threads, β for odd (the parity
// lwc_sigmoids uses, so σ of the raw value lands where lwc_sigmoids_of expects it).
__device__ __forceinline__ float* lane_param(const LwcOptPtrs& o) { return (threadIdx.x & 1) ? o.beta : o.gamma; }
__device__ __forceinline__ float* lane_m(const LwcOptPtrs& o) { return (threadIdx.x & 1) ? o.m_beta : o.m_gamma; }
__device__ __forceinline__ float* lane_v(const LwcOptPtrs& o) { return (threadIdx.x & 1) ? o.v_beta : o.v_gamma; }

// Step 2: the team's dscale, summed exactly as fake_quant_backward_v2<kItems, false> sums it.
template <int kItems, typename TX, typename TG, int kVec, typename XR, typename GR>
__device__ __forceinline__ float lwc_dscale(const Tile& t, const GroupState& s, const TX* xg, const TG* gg,
                                            const XR& xr, const GR& gr, int n, const Levels& L, float* smem) {
  const float rcp = __frcp_rn(s.scale);
  const SteBounds B = ste_bounds(s, L);
  float acc[1] = {0.0f};
  auto body = [&](auto fast_c) {
    constexpr bool kFast = decltype(fast_c)::value;
    auto accumulate = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp) {
      float v[kVec], g[kVec];
      unpack(xp, v);
      unpack(gp, g);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const ElemGrad e = elem_grad<kFast>(v[i], s, rcp, B);
        acc[0] = __fmaf_rn(g[i], e.dscale_term, acc[0]);
      }
    };
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { accumulate(xr[j], gr[j]); },
                  [&](int c) { accumulate(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c)); });
  };
  if (t.valid) {
    if (fast_div_ok(s.xmax, s.xmin, rcp)) body(std::true_type{});
    else body(std::false_type{});
  }
  team_reduce<1>(acc, [](float p, float q) { return p + q; }, t.tp, smem);
  return acc[0];
}

// Steps 1–4 for the thread's group. p, m, v: the thread's raw parameter (lane_param) of group t.k and
// its moments, already loaded. xr / gr: the thread's cached vectors of x and dy (registers or a
// shared-memory stage), xg / gg / yg: the group's start in x, dy and ŵ. Every thread of the block must
// call it (shuffles, and block teams' barriers).
template <int kItems, typename TX, typename TG, typename TY, int kVec, typename XR, typename GR>
__device__ __forceinline__ void lwc_update_group(const Tile& t, const TX* xg, const TG* gg, TY* yg, const XR& xr,
                                                 const GR& gr, float p, float m, float v, const LwcOptPtrs& o, int n,
                                                 const Levels& L, float* smem) {
  float a, b;
  lwc_sigmoids_of(p, t.tp, a, b);
  float own[2];
  const GroupState s = tile_state_ab<kItems, TX, kVec>(t, xg, xr, n, a, b, L, smem, own);
  const float dscale = lwc_dscale<kItems, TX, TG, kVec>(t, s, xg, gg, xr, gr, n, L, smem);
  const GroupGrad grad = group_grad(s, dscale, L, true);

  const bool odd = (threadIdx.x & 1) != 0;
  const omniq::detail::AdamWScalars sc = o.scalars[odd ? o.slot_beta : o.slot_gamma];
  omniq::detail::adamw_update(p, m, v, odd ? grad.dbeta : grad.dgamma, sc);
  if (t.valid && t.tp.lane < 2) {  // lane 0 (even thread): γ; lane 1 (odd): β
    lane_param(o)[t.k] = p;
    lane_m(o)[t.k] = m;
    lane_v(o)[t.k] = v;
  }
  lwc_sigmoids_of(p, t.tp, a, b);  // σ(γ'), σ(β') from the team's first two lanes
  if (!t.valid) return;            // no shuffle or barrier follows

  const GroupState s2 = group_state(s.xmax, s.xmin, a, b, L);
  const float rcp = __frcp_rn(s2.scale);
  auto body = [&](auto fast_c) {
    constexpr bool kFast = decltype(fast_c)::value;
    auto emit = [&](const Pack<TX, kVec>& pk, int c) {
      float xv[kVec], out[kVec];
      unpack(pk, xv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = fake_quant_elem<kFast>(xv[i], s2, rcp, L);
      store_pack<TY, kVec>(yg + c, out);
    };
    sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], c); },
                  [&](int c) { emit(load_pack<TX, kVec>(xg + c), c); });
  };
  if (fast_div_ok(s2.xmax, s2.xmin, rcp)) body(std::true_type{});
  else body(std::false_type{});
}

// The streaming kernel (fake_quant_lwc_update_stream.cu) for 16-bit x in 16-byte vectors, TG = float or
// TY, with group_launch's geometry `l` (backward = true). Returns false where it does not apply (rows
// longer than 4 vectors a thread, not enough shared memory): the caller runs the register kernel.
template <typename TX, typename TG, typename TY>
bool launch_lwc_update_stream(const GroupLaunch& l, const TG* dy, const TX* x, TY* y, const LwcOptPtrs& o,
                              int64_t groups, int n, const Levels& L, CudaContext& ctx);

}  // namespace omniq::cuda::fq
