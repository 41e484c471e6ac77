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
// groups (≤ 256 vectors of 16 bytes of x: g32..g128, head_dim) 4..32 lanes of a warp (≈4 vectors a
// lane, shuffles only); long groups (per-channel rows of 4096..11008, per-token rows) a block of
// 128/256/512 threads (≤ kItems vectors a thread, shuffles + one trip through shared memory).
// One pass over memory: every thread loads its vectors of x (and dy) into registers first, so all
// its loads are in flight at once, reduces min/max (and dscale), and writes y (or dx, dγ, dβ) from
// the registers. Only rows longer than 512·kItems vectors (> 16384 f32) re-read the excess (L1/L2).
// Napkin math (H100, 3.35 TB/s), LLaMA-7B block = 202 M weights, f32 master weights:
//   forward f32 → bf16: 4 + 2 bytes/weight = 1.21 GB ≈ 0.36 ms;
//   backward dy f32, dγ/dβ only: 4 + 4 bytes/weight = 1.62 GB ≈ 0.48 ms (dw adds 4 bytes/weight).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/fake_quant.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

// ==== CUDA kernels ===========================================================================

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

// Which group this thread works on and where it sits in its team. team > 0: warp teams of `team`
// lanes (a power of two, 4..32); team == 0: the whole block owns one group.
struct TeamPos {
  bool block_team;
  int size, lane;
  int64_t group;
};

__device__ __forceinline__ TeamPos team_pos(int team) {
  if (team == 0) return {true, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), blockIdx.x};
  return {false, team, static_cast<int>(threadIdx.x) & (team - 1),
          blockIdx.x * static_cast<int64_t>(blockDim.x / team) + threadIdx.x / team};
}

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

// σ(γ_k), σ(β_k) of the thread's group. The fp64 exp is the costliest per-group step, so one warp
// instruction stream computes both: even lanes σ(γ), odd lanes σ(β), then every lane takes them from
// its team's first two lanes (a block team's group is the same for the whole warp). All 32 lanes
// must call it; k must be a valid index.
__device__ __forceinline__ void lwc_sigmoids(const float* gamma, const float* beta, int64_t k, const TeamPos& tp,
                                             float& a, float& b) {
  a = b = 1.0f;
  if (!gamma) return;
  const int wl = threadIdx.x & 31;
  const float s = sigmoid_f64((wl & 1) ? beta[k] : gamma[k]);
  const int first = tp.block_team ? 0 : (wl & ~(tp.size - 1));
  a = __shfl_sync(0xffffffffu, s, first);
  b = __shfl_sync(0xffffffffu, s, first + 1);
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = ld_f32(pk.v[i]);
}

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
__device__ __forceinline__ Tile make_tile(int team, int64_t groups, int n) {
  const TeamPos tp = team_pos(team);
  const bool valid = tp.group < groups;
  const int64_t k = valid ? tp.group : 0;
  return {tp, valid, k, k * static_cast<int64_t>(n), tp.lane * kVec, tp.size * kVec};
}

// Min/max of the group (registers first, the excess re-read), σ(γ), σ(β), and the group state.
template <int kItems, typename TX, int kVec>
__device__ __forceinline__ GroupState tile_state(const Tile& t, const TX* xg, const Pack<TX, kVec> (&xr)[kItems],
                                                 int n, const float* gamma, const float* beta, const Levels& L,
                                                 float* smem) {
  float a, b;
  lwc_sigmoids(gamma, beta, t.k, t.tp, a, b);  // overlaps the loads in flight
  float r[2] = {-INFINITY, -INFINITY};
  if (t.valid)
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { min_max_of(xr[j], r); },
                  [&](int c) { min_max_of(load_pack<TX, kVec>(xg + c), r); });
  team_reduce<2>(r, [](float p, float q) { return fmaxf(p, q); }, t.tp, smem);
  return group_state(r[0], -r[1], a, b, L);  // garbage but harmless for an invalid tail
}

// y = x̂ for every group (groups = numel / n); x and y may have different dtypes.
template <typename TX, typename TY, int kVec>
__global__ void __launch_bounds__(kMaxBlock) fake_quant_forward_kernel(const TX* __restrict__ x, TY* __restrict__ y,
                                                                      const float* __restrict__ gamma,
                                                                      const float* __restrict__ beta, int64_t groups,
                                                                      int n, int team, Levels L) {
  constexpr int kItems = cache_items<kVec, false>();
  __shared__ float smem[32 * 2];
  const Tile t = make_tile<kVec>(team, groups, n);
  const TX* xg = x + t.off;
  Pack<TX, kVec> xr[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j)  // issue every load before using any
    if (t.valid && t.c0 + j * t.step < n) xr[j] = load_pack<TX, kVec>(xg + t.c0 + j * t.step);
  const GroupState s = tile_state<kItems>(t, xg, xr, n, gamma, beta, L, smem);
  if (!t.valid) return;  // no shuffle follows

  TY* yg = y + t.off;
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
// [x = xmin]. dy may have another dtype than x; dx has x's.
template <typename TX, typename TG, int kVec>
__global__ void __launch_bounds__(kMaxBlock)
    fake_quant_backward_kernel(const TG* __restrict__ dy, const TX* __restrict__ x, TX* __restrict__ dx,
                               const float* __restrict__ gamma, const float* __restrict__ beta,
                               float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t groups, int n, int team,
                               Levels L) {
  constexpr int kItems = cache_items<kVec, true>();
  __shared__ float smem[32 * 3];
  const Tile t = make_tile<kVec>(team, groups, n);
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
  const GroupState s = tile_state<kItems>(t, xg, xr, n, gamma, beta, L, smem);

  const bool want_dx = dx != nullptr;  // uniform over the launch: every thread takes the same branches
  float acc[3] = {0.0f, 0.0f, 0.0f};   // dscale, #(x == xmax), #(x == xmin) (exact up to 2^24)
  auto accumulate = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp) {
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
      }
    }
  };
  if (t.valid)
    sweep<kItems>(t.c0, t.step, n, [&](int j, int) { accumulate(xr[j], gr[j]); },
                  [&](int c) { accumulate(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c)); });
  auto sum = [](float p, float q) { return p + q; };
  if (want_dx) team_reduce<3>(acc, sum, t.tp, smem);
  else team_reduce<1>(acc, sum, t.tp, smem);
  if (!t.valid) return;

  // Chain rule from dscale to the clipped range, LWC parameters and the raw max/min (CPU: group_grad).
  const float ds = (s.scale_raw >= 1e-5f && s.scale_raw <= 1e4f) ? acc[0] : 0.0f;
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
  const float dxmax = gamma ? dhi * s.a : dhi, dxmin = gamma ? dlo * s.b : dlo;
  if (gamma && t.tp.lane == 0) {
    dgamma[t.k] = (dhi * s.xmax) * ((1.0f - s.a) * s.a);
    dbeta[t.k] = (dlo * s.xmin) * ((1.0f - s.b) * s.b);
  }
  if (!want_dx) return;
  const float share_max = dxmax / acc[1], share_min = dxmin / acc[2];
  TX* dxg = dx + t.off;
  auto emit = [&](const Pack<TX, kVec>& xp, const Pack<TG, kVec>& gp, int c) {
    float v[kVec], g[kVec], o[kVec];
    unpack(xp, v);
    unpack(gp, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const ElemQ e = quantize(v[i], s, L);
      float d = e.in ? g[i] : 0.0f;
      d = __fadd_rn(d, v[i] == s.xmax ? share_max : 0.0f);
      d = __fadd_rn(d, v[i] == s.xmin ? share_min : 0.0f);
      o[i] = d;
    }
    store_pack<TX, kVec>(dxg + c, o);
  };
  sweep<kItems>(t.c0, t.step, n, [&](int j, int c) { emit(xr[j], gr[j], c); },
                [&](int c) { emit(load_pack<TX, kVec>(xg + c), load_pack<TG, kVec>(gg + c), c); });
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

Levels make_levels(const GroupQuantParams& p) {
  const float qhi = static_cast<float>(p.symmetric ? (1 << (p.bits - 1)) - 1 : (1 << p.bits) - 1);
  return {p.symmetric ? -static_cast<float>(1 << (p.bits - 1)) : 0.0f, qhi, qhi, p.symmetric};
}

struct GroupLaunch {
  int team;  // 4..32 lanes, or 0 = the whole block
  bool vec;  // kVec = 16 bytes of x per access; else one element
  dim3 grid, block;
};

// A pointer of dtype dt accessed `pack` elements at a time.
bool pack_ok(const void* p, DType dt, int64_t pack) {
  const size_t align = pack_align(static_cast<size_t>(pack) * dtype_size(dt));
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % align == 0;
}

// Vector accesses need the group length to be a multiple of the pack (16 bytes of x) and every
// pointer aligned for its own pack. Teams are sized so that each thread holds ≈4 (warp teams) or
// ≤ `items` (block teams) vectors.
GroupLaunch group_launch(int64_t groups, int64_t n, DType xdt, std::initializer_list<std::pair<const void*, DType>> ptrs,
                         bool backward, const char* op) {
  OMNIQ_CHECK(n < (int64_t{1} << 30), "%s: group of %lld elements is too long", op, static_cast<long long>(n));
  GroupLaunch l;
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(xdt));
  l.vec = n % pack == 0;
  for (const auto& [p, dt] : ptrs) l.vec = l.vec && pack_ok(p, dt, pack);
  const int64_t nvec = l.vec ? n / pack : n;
  // Must agree with cache_items<kVec, backward>() of the kernel that will run.
  const int64_t items = backward && l.vec && pack == 8 ? 4 : 8;
  if (nvec <= 32 * items) {
    const int64_t want = (nvec + 3) / 4;  // ≈4 vectors per lane
    l.team = 4;
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

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the CUDA storage type of a float dtype.
template <typename F>
void dispatch_float(DType dt, const char* op, F&& f) {
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
void dispatch_pair(DType xdt, DType odt, bool vec, const char* op, F&& f) {
  dispatch_float(xdt, op, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_float(odt, op, [&](auto ot) {
      if (vec) f(xt, ot, std::integral_constant<int, static_cast<int>(16 / sizeof(TX))>{});
      else f(xt, ot, std::integral_constant<int, 1>{});
    });
  });
}

}  // namespace

void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y) {
  const char* op = "fake_quant_forward";
  const int64_t n = p.group, groups = x.numel() / n;
  const GroupLaunch l = group_launch(groups, n, x.dtype(), {{x.data(), x.dtype()}, {y.data(), y.dtype()}}, false, op);
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(x.device());
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  dispatch_pair(x.dtype(), y.dtype(), l.vec, op, [&](auto xt, auto yt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TY = typename decltype(yt)::type;
    fake_quant_forward_kernel<TX, TY, decltype(vec_c)::value><<<l.grid, l.block, 0, ctx.stream>>>(
        x.data_as<const TX>(), y.data_as<TY>(), gp, bp, groups, static_cast<int>(n), l.team, L);
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
  dispatch_pair(x.dtype(), dy.dtype(), l.vec, op, [&](auto xt, auto gt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TG = typename decltype(gt)::type;
    fake_quant_backward_kernel<TX, TG, decltype(vec_c)::value><<<l.grid, l.block, 0, ctx.stream>>>(
        dy.data_as<const TG>(), x.data_as<const TX>(), dx ? dx->data_as<TX>() : nullptr, gp, bp, dgp, dbp, groups,
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
