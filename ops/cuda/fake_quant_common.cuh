// Device building blocks shared by the fake-quant kernels (fake_quant.cu: plain weight/activation
// quantizers; fake_quant_let.cu: the weight quantizer with LET's scales applied on the fly): storage
// conversions, 16-byte packs, the quantizer's per-group state and per-element rounding (the exact
// operation order the CPU reference uses, see ops/fake_quant.h), team reductions, and the dtype
// dispatch of the launchers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "ops/fake_quant.h"
#include "runtime/error.h"

namespace omniq::cuda::fq {

constexpr int kMaxBlock = 512;  // largest block team (launch bounds of the kernels)

// Vectors a thread keeps in registers. The backward caches x and dy, so with 16-byte vectors of a
// 16-bit x (8 elements, whose dy may be 32 bytes of f32) it keeps 4, which stays clear of spills
// under the 128-register cap of 512-thread blocks; everything else keeps 8.
template <int kVec, bool kBackward>
constexpr int cache_items() { return kBackward && kVec == 8 ? 4 : 8; }

// ---- storage types: fp32 in, fp32 out, round to nearest even like the host conversions -----

__device__ __forceinline__ float ld_f32(float v) { return v; }
__device__ __forceinline__ float ld_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T st_as(float v);
template <> __device__ __forceinline__ float st_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 st_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half st_as<__half>(float v) { return __float2half_rn(v); }

// N consecutive elements moved as one access (two 16-byte accesses for 32 bytes). The launcher
// checks that the pointers are aligned to min(N·sizeof(T), 16) bytes and that N divides the group.
constexpr size_t pack_align(size_t bytes) { return bytes >= 16 ? 16 : bytes; }
template <typename T, int N>
struct alignas(pack_align(N * sizeof(T))) Pack { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) { return *reinterpret_cast<const Pack<T, N>*>(p); }

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&o)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = st_as<T>(o[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// ---- the quantizer (same operations in the same order as the CPU reference) -----------------

// Integer range of the quantized values and the divisor of the scale (see levels() in the CPU file).
struct Levels {
  float qlo, qhi, qdiv;
  bool symmetric;
};

__device__ __forceinline__ float sigmoid_f64(float g) {
  return static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(g))));
}

struct GroupState {
  float xmax, xmin, a, b, hi, lo, scale_raw, scale, zp;
};

__device__ __forceinline__ GroupState group_state(float xmax, float xmin, float a, float b, const Levels& L) {
  GroupState s{xmax, xmin, a, b, __fmul_rn(a, xmax), __fmul_rn(b, xmin), 0.0f, 0.0f, 0.0f};
  s.scale_raw = L.symmetric ? __fdiv_rn(fmaxf(fabsf(s.hi), fabsf(s.lo)), L.qdiv)
                            : __fdiv_rn(__fsub_rn(s.hi, s.lo), L.qdiv);
  s.scale = fminf(fmaxf(s.scale_raw, 1e-5f), 1e4f);
  s.zp = L.symmetric ? 0.0f : rintf(fminf(fmaxf(__fdiv_rn(-s.lo, s.scale), -1e4f), 1e4f));
  return s;
}

struct ElemQ {
  float u, t, q;
  bool in;
};

__device__ __forceinline__ ElemQ quantize(float x, const GroupState& s, const Levels& L) {
  const float u = __fdiv_rn(x, s.scale), t = rintf(u);  // rint: round half to even
  const float v = __fadd_rn(t, s.zp);
  return {u, t, fminf(fmaxf(v, L.qlo), L.qhi), v >= L.qlo && v <= L.qhi};
}

__device__ __forceinline__ float dequantize(const ElemQ& e, const GroupState& s) {
  return __fmul_rn(__fsub_rn(e.q, s.zp), s.scale);
}

// ---- v2: the same quantizer with a cheaper exact division (default; OMNIQ_FQ_V1=1 = the above) ----
//
// __fdiv_rn costs ≈ 10 instructions plus a slow-path check and branch per element, most of a
// memory-bound kernel's budget. Every element of a group is divided by the same scale s, so v2
// takes y = RN(1/s) once (__frcp_rn, IEEE) and per element
//   q = RN(x·y);  r = x − s·q (one FMA);  q = RN(q + r·y);  r = x − s·q;  q = RN(q + r·y)
// (5 instructions). After the first correction |q − x/s| < 1 ulp (the error left is
// ≈ (x/s − q₀)(s·y − 1), below 2⁻²³ ulp, plus the rounding's ½ ulp), so the second residual is
// exact (FMA) and, by Markstein's theorem (y within ½ ulp of 1/s, q within 1 ulp of x/s), the second
// correction returns RN(x/s): the same bits as __fdiv_rn and the CPU's x / s. (One correction was
// also exact on 4.6e8 sampled quotients, but without a proof; the second costs 2 FFMA.)
// Preconditions, checked per group by fast_div_ok (the kernels fall back to __fdiv_rn for the whole
// group otherwise): no overflow, |x/s| ≤ 2^100 for every x of the group. Tiny |x| < 2^-100 may make
// the residual inexact (subnormal), but then |x/s| < 2^-83: round(x/s) = ±0 either way, so x̂ and
// the STE decision are unchanged and only the backward's t − u term moves, by < 2^-83.
__device__ __forceinline__ float div_by_scale(float x, float s, float y) {
  float q = __fmul_rn(x, y);
  float r = __fmaf_rn(-s, q, x);
  q = __fmaf_rn(r, y, q);
  r = __fmaf_rn(-s, q, x);
  return __fmaf_rn(r, y, q);
}

// Whether div_by_scale is exact for every element of a group whose values lie in [xmin, xmax]
// (max(xmax, −xmin) bounds |x|; a NaN or infinite bound fails the test).
__device__ __forceinline__ bool fast_div_ok(float xmax, float xmin, float y) {
  return __fmul_rn(fmaxf(xmax, -xmin), y) <= 0x1p100f;
}

// x̂ of one element (v2): bit-identical to dequantize(quantize(x, s, L), s), with u from
// div_by_scale when kFast (y = RN(1/scale)) and from __fdiv_rn otherwise.
template <bool kFast>
__device__ __forceinline__ float quotient(float x, const GroupState& s, float y) {
  return kFast ? div_by_scale(x, s.scale, y) : __fdiv_rn(x, s.scale);
}

template <bool kFast>
__device__ __forceinline__ float fake_quant_elem(float x, const GroupState& s, float y, const Levels& L) {
  const float t = rintf(quotient<kFast>(x, s, y));
  const float q = fminf(fmaxf(__fadd_rn(t, s.zp), L.qlo), L.qhi);  // t + zp first: −0 becomes +0 as on the CPU
  return __fmul_rn(__fsub_rn(q, s.zp), s.scale);
}

// The backward's per-element quantities (v2) with fewer instructions than quantize(): with
// lo' = qlo − zp, hi' = qhi − zp (exact: small integers), c = clamp(t, lo', hi') equals
// clamp(t + zp, qlo, qhi) − zp (t + zp is exact for |t| < 2^23, and larger |t| is clipped to the same
// bound either way; a NaN t gives lo' in both), and the STE passes exactly when c == t. So
//   in = (c == t),   ∂x̂/∂scale = in ? t − u : c   (= q − zp of ops/fake_quant.h)
// are the same values as v1's, from one clamp and one compare.
struct SteBounds {
  float lo, hi;  // qlo − zp, qhi − zp
};

__device__ __forceinline__ SteBounds ste_bounds(const GroupState& s, const Levels& L) {
  return {__fsub_rn(L.qlo, s.zp), __fsub_rn(L.qhi, s.zp)};
}

struct ElemGrad {
  float dscale_term;  // ∂x̂/∂scale
  bool in;            // the STE passes dy
};

template <bool kFast>
__device__ __forceinline__ ElemGrad elem_grad(float x, const GroupState& s, float y, const SteBounds& B) {
  const float u = quotient<kFast>(x, s, y), t = rintf(u);
  const float c = fminf(fmaxf(t, B.lo), B.hi);
  const bool in = c == t;
  return {in ? __fsub_rn(t, u) : c, in};
}

// Gradients of one group from dscale = Σ dy·∂x̂/∂scale: the chain rule to the clipped range, the LWC
// parameters and the raw max/min (CPU twin: group_grad in ops/cpu/fake_quant.cpp). dxmax / dxmin
// are then shared among the group's argmax / argmin elements.
struct GroupGrad {
  float dgamma, dbeta, dxmax, dxmin;
};

__device__ __forceinline__ GroupGrad group_grad(const GroupState& s, float dscale, const Levels& L, bool lwc) {
  const float ds = (s.scale_raw >= 1e-5f && s.scale_raw <= 1e4f) ? dscale : 0.0f;  // the clamp passes inside
  float dhi, dlo;
  if (L.symmetric) {
    const float dabs = ds / L.qdiv;
    const float ah = fabsf(s.hi), al = fabsf(s.lo);
    const float share_hi = ah > al ? 1.0f : (ah < al ? 0.0f : 0.5f);
    dhi = dabs * share_hi * static_cast<float>((s.hi > 0.0f) - (s.hi < 0.0f));
    dlo = dabs * (1.0f - share_hi) * static_cast<float>((s.lo > 0.0f) - (s.lo < 0.0f));
  } else {
    dhi = ds / L.qdiv;
    dlo = -dhi;
  }
  GroupGrad g;
  g.dgamma = (dhi * s.xmax) * ((1.0f - s.a) * s.a);
  g.dbeta = (dlo * s.xmin) * ((1.0f - s.b) * s.b);
  g.dxmax = lwc ? dhi * s.a : dhi;
  g.dxmin = lwc ? dlo * s.b : dlo;
  return g;
}

// Which group this thread works on and where it sits in its team. team > 0: warp teams of `team`
// lanes (a power of two, 2..32); team == 0: the whole block owns one group.
struct TeamPos {
  bool block_team;
  int size, lane;
  int64_t group;
};

// tile: the block's unit of work (blockIdx.x, or the iteration of a grid-stride loop).
__device__ __forceinline__ TeamPos team_pos(int team, int64_t tile) {
  if (team == 0) return {true, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), tile};
  return {false, team, static_cast<int>(threadIdx.x) & (team - 1),
          tile * static_cast<int64_t>(blockDim.x / team) + threadIdx.x / team};
}
__device__ __forceinline__ TeamPos team_pos(int team) { return team_pos(team, blockIdx.x); }

// Reduces v[0..N) over the team with op; every thread of the team gets the same result (a xor
// butterfly, then for block teams the per-warp results in warp order, so the result does not
// depend on timing). All 32 lanes of every warp must call it. smem: 32·N floats; the leading
// barrier allows repeated calls.
template <int N, typename Op>
__device__ __forceinline__ void team_reduce(float* v, Op op, const TeamPos& tp, float* smem) {
  const int width = tp.block_team ? 32 : tp.size;
  for (int o = width / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  }
  if (tp.block_team) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) smem[warp * N + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float r = smem[k];
      for (int w = 1; w < nwarps; ++w) r = op(r, smem[w * N + k]);
      v[k] = r;
    }
  }
}

// lwc_sigmoids below from the lane's raw parameter (even lanes γ_k, odd lanes β_k), e.g. prefetched.
__device__ __forceinline__ void lwc_sigmoids_of(float raw, const TeamPos& tp, float& a, float& b) {
  const int wl = threadIdx.x & 31;
  const float s = sigmoid_f64(raw);
  const int first = tp.block_team ? 0 : (wl & ~(tp.size - 1));
  a = __shfl_sync(0xffffffffu, s, first);
  b = __shfl_sync(0xffffffffu, s, first + 1);
}

// σ(γ_k), σ(β_k) of the thread's group. The fp64 exp is the costliest per-group step, so one warp
// instruction stream computes both: even lanes σ(γ), odd lanes σ(β), then every lane takes them from
// its team's first two lanes (a block team's group is the same for the whole warp). All 32 lanes
// must call it; k must be a valid index.
__device__ __forceinline__ void lwc_sigmoids(const float* gamma, const float* beta, int64_t k, const TeamPos& tp,
                                             float& a, float& b) {
  a = b = 1.0f;
  if (!gamma) return;
  lwc_sigmoids_of((threadIdx.x & 1) ? beta[k] : gamma[k], tp, a, b);
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = ld_f32(pk.v[i]);
}

// ==== host side of the launchers ==========================================================

// OMNIQ_FQ_V1=1 (any value but "" and "0") selects the v1 kernels (__fdiv_rn per element) for A/B
// measurements; read at every launch so a test can compare both paths in one process.
inline bool fq_v1_requested() {
  const char* e = std::getenv("OMNIQ_FQ_V1");
  return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
}

// Vectors per lane of the v2 forward's warp teams (fake_quant.cu, group_launch): 4 (v1's team
// sizes), or 8 with OMNIQ_FQ_LANE_VECS=8, an A/B switch for measurements. H100, 7B g128 shapes:
// 4 gives 83% of DRAM peak, 8 (twice the loads per thread, half the lanes) only 64-74%.
inline int fq_v2_forward_lane_vecs() {
  const char* e = std::getenv("OMNIQ_FQ_LANE_VECS");
  return e != nullptr && e[0] == '8' && e[1] == '\0' ? 8 : 4;
}

// OMNIQ_FQ_V2_OLD=1 runs the first v2 backward without dx (one group tile per block, loads straight
// into registers) instead of the streaming v2.1 kernel (fake_quant.cu), for A/B measurements.
inline bool fq_v2_old_requested() {
  const char* e = std::getenv("OMNIQ_FQ_V2_OLD");
  return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
}

// Shared-memory stages of the streaming backward: 2 (default: one tile computed while the next is in
// flight, 3 blocks of 256 threads per SM for g128) or 3 with OMNIQ_FQ_STAGES=3 (two tiles in flight,
// 2 blocks per SM), an A/B switch.
inline int fq_stream_stages() {
  const char* e = std::getenv("OMNIQ_FQ_STAGES");
  return e != nullptr && e[0] == '3' && e[1] == '\0' ? 3 : 2;
}

inline Levels make_levels(const GroupQuantParams& p) {
  const float qhi = static_cast<float>(p.symmetric ? (1 << (p.bits - 1)) - 1 : (1 << p.bits) - 1);
  return {p.symmetric ? -static_cast<float>(1 << (p.bits - 1)) : 0.0f, qhi, qhi, p.symmetric};
}

// A pointer of dtype dt accessed `pack` elements at a time.
inline bool pack_ok(const void* p, DType dt, int64_t pack) {
  const size_t align = pack_align(static_cast<size_t>(pack) * dtype_size(dt));
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % align == 0;
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the CUDA storage type of a float dtype.
template <typename F>
inline void dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); return;
    case DType::f16: f(Tag<__half>{}); return;
    default: OMNIQ_FAIL("%s: the CUDA kernels support f32, bf16 and f16 tensors, got %s", op, dtype_name(dt));
  }
}

// Calls f(Tag<TX>, Tag<TO>, vec width constant) for x's dtype, the other tensor's dtype and the
// launch's access width.
template <typename F>
inline void dispatch_pair(DType xdt, DType odt, bool vec, const char* op, F&& f) {
  dispatch_float(xdt, op, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_float(odt, op, [&](auto ot) {
      if (vec) f(xt, ot, std::integral_constant<int, static_cast<int>(16 / sizeof(TX))>{});
      else f(xt, ot, std::integral_constant<int, 1>{});
    });
  });
}

}  // namespace omniq::cuda::fq
