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
// (cp.async into shared memory) while it reduces the current one; same bits as v2
// (fake_quant_backward_stream.cu). The per-group device code and group_launch are in
// fake_quant_group.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/cuda/fake_quant_common.cuh"
#include "ops/cuda/fake_quant_group.cuh"
#include "ops/fake_quant.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace fq;  // the shared building blocks (fake_quant_common.cuh)

// ==== CUDA kernels ===========================================================================

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

// Per group: dscale = Σ dy·∂x̂/∂scale (and, when dx is wanted, the tie counts of max/min) as team
// sums, then dγ/dβ and, when dx != nullptr, dx = dy·in + dxmax/#argmax·[x = xmax] + dxmin/#argmin·
// [x = xmin]. dy may have another dtype than x; dx has x's. kMode: 0 = v1, 1 = v2 without dx (dx must
// be null), 2 = v2 with dx (fake_quant_backward_v2, fake_quant_group.cuh).
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

// y = sign(s)·max(|s|, floor), sign(0) = +1 (NaN stays NaN).
template <typename T>
__global__ void abs_floor_kernel(const T* __restrict__ s, T* __restrict__ y, int64_t n, float floor) {
  for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) {
    float v = ld_f32(s[i]);
    if (fabsf(v) < floor) v = v < 0.0f ? -floor : floor;
    y[i] = st_as<T>(v);
  }
}

}  // namespace

// ==== kernel launchers =======================================================================

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
