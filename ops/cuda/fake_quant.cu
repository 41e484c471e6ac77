// CUDA fake quantizers: fused weight (LWC) / per-token activation quantizer forward and backward,
// and the |s| floor of LET. Semantics and gradient rules in ops/fake_quant.h; the CPU twin is
// ops/cpu/fake_quant.cpp and x̂ must match it bit for bit in f32.
//
// Bit equality: every step of the quantizer uses the explicitly rounded intrinsics (__fdiv_rn,
// __fmul_rn, __fadd_rn, __fsub_rn) so nvcc can neither contract a multiply-add into an FMA nor use
// an approximate division; σ(γ) is computed in fp64 and rounded once, like the CPU.
//
// Layout: groups are contiguous runs of `group` elements (a weight [out, in] with group g is
// [out·in/g, g]; an activation [..., C] is rows × C), so one *team* of threads owns one group:
//   - short groups (≤ 256 vectors: g ≤ 1024 f32 / 2048 bf16, e.g. g32..g128, head_dim, hidden 2048):
//     kTeam = 4..32 lanes of a warp, 256/kTeam groups per block, shuffle reductions only;
//   - long groups (per-channel rows of 4096..28672, per-token rows of a large hidden): a whole
//     block of 256 or 512 threads, shuffles + one trip through shared memory.
// Pass 1 reduces min/max, pass 2 quantizes (forward) or reduces dscale and the tie counts
// (backward), pass 3 (backward, only when dx is wanted) writes dx. The later passes re-read the
// group, which is at most 56 KB and is served from L1/L2, so DRAM traffic is one read of x (and
// dy) plus one write: napkin math for a 4096×11008 bf16 weight, ~180 MB forward, ~270 MB backward,
// i.e. ~60–90 µs at H100 bandwidth, small next to the block's matmuls. Accesses are 16 bytes
// (4 f32 / 8 bf16) when the group length and pointers allow it.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/fake_quant.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using ew::from_f32;
using ew::to_f32;

// =============================================================================================
// CUDA kernels
// =============================================================================================

// Integer range of the quantized values and the divisor of the scale (see levels() in the CPU file).
struct Levels {
  float qlo, qhi, qdiv;
  bool symmetric;
};

// The threads that own one group: kTeam consecutive lanes of a warp, or the block (kTeam == 0).
template <int kTeam>
struct Team {
  __device__ static int size() { return kTeam ? kTeam : static_cast<int>(blockDim.x); }
  __device__ static int lane() { return kTeam ? static_cast<int>(threadIdx.x) % kTeam : static_cast<int>(threadIdx.x); }
  __device__ static int64_t group() {
    return kTeam ? blockIdx.x * static_cast<int64_t>(blockDim.x / kTeam) + threadIdx.x / kTeam
                 : static_cast<int64_t>(blockIdx.x);
  }
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Reduces v[0..N) over the team with op; every thread of the team gets the same result (a xor
// butterfly, then for block teams the per-warp results in warp order). All 32 lanes of every warp
// must call it (full shuffle mask). smem: 32·N floats; the leading barrier allows repeated calls.
template <int kTeam, int N, typename Op>
__device__ __forceinline__ void team_reduce(float (&v)[N], Op op, float* smem) {
  constexpr int kWidth = kTeam ? kTeam : 32;
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  }
  if constexpr (kTeam == 0) {
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

__device__ __forceinline__ float sigmoid_f64(float g) {
  return static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(g))));
}

struct GroupState {
  float xmax, xmin, a, b, hi, lo, scale_raw, scale, zp;
};

// Per-group quantizer parameters; the same operations in the same order as the CPU reference.
__device__ __forceinline__ GroupState group_state(float xmax, float xmin, const float* gamma, const float* beta,
                                                  int64_t k, const Levels& L) {
  GroupState s;
  s.xmax = xmax;
  s.xmin = xmin;
  s.a = gamma ? sigmoid_f64(gamma[k]) : 1.0f;
  s.b = beta ? sigmoid_f64(beta[k]) : 1.0f;
  s.hi = __fmul_rn(s.a, xmax);
  s.lo = __fmul_rn(s.b, xmin);
  if (L.symmetric) {
    s.scale_raw = __fdiv_rn(fmaxf(fabsf(s.hi), fabsf(s.lo)), L.qdiv);
  } else {
    s.scale_raw = __fdiv_rn(__fsub_rn(s.hi, s.lo), L.qdiv);
  }
  s.scale = fminf(fmaxf(s.scale_raw, 1e-5f), 1e4f);
  s.zp = L.symmetric ? 0.0f : rintf(fminf(fmaxf(__fdiv_rn(-s.lo, s.scale), -1e4f), 1e4f));
  return s;
}

struct ElemQ {
  float u, t, q;
  bool in;
};

__device__ __forceinline__ ElemQ quantize(float x, const GroupState& s, const Levels& L) {
  ElemQ e;
  e.u = __fdiv_rn(x, s.scale);
  e.t = rintf(e.u);  // round half to even
  const float v = __fadd_rn(e.t, s.zp);
  e.in = v >= L.qlo && v <= L.qhi;
  e.q = fminf(fmaxf(v, L.qlo), L.qhi);
  return e;
}

__device__ __forceinline__ float dequantize(const ElemQ& e, const GroupState& s) {
  return __fmul_rn(__fsub_rn(e.q, s.zp), s.scale);
}

// (max, −min) of the group's elements over the team: one max-reduction for both.
template <typename T, int kVec, int kTeam>
__device__ __forceinline__ void group_min_max(const T* xg, int n, bool valid, float* smem, float& xmax,
                                              float& xmin) {
  float r[2] = {-INFINITY, -INFINITY};
  if (valid) {
    for (int c = Team<kTeam>::lane() * kVec; c < n; c += Team<kTeam>::size() * kVec) {
      float v[kVec];
      ew::load_n<kVec>(xg + c, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        r[0] = fmaxf(r[0], v[i]);
        r[1] = fmaxf(r[1], -v[i]);
      }
    }
  }
  team_reduce<kTeam, 2>(r, MaxOp{}, smem);
  xmax = r[0];
  xmin = -r[1];
}

// y = x̂ for every group (groups = numel / n).
template <typename T, int kVec, int kTeam>
__global__ void fake_quant_forward_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ gamma,
                                          const float* __restrict__ beta, int64_t groups, int n, Levels L) {
  __shared__ float smem[32 * 2];
  const int64_t k = Team<kTeam>::group();
  const bool valid = k < groups;  // only a warp-team tail can be invalid; it must still shuffle
  const T* xg = x + (valid ? k : 0) * static_cast<int64_t>(n);
  float xmax, xmin;
  group_min_max<T, kVec, kTeam>(xg, n, valid, smem, xmax, xmin);
  if (!valid) return;  // no shuffle follows
  const GroupState s = group_state(xmax, xmin, gamma, beta, k, L);
  T* yg = y + k * static_cast<int64_t>(n);
  for (int c = Team<kTeam>::lane() * kVec; c < n; c += Team<kTeam>::size() * kVec) {
    float v[kVec], o[kVec];
    ew::load_n<kVec>(xg + c, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = dequantize(quantize(v[i], s, L), s);
    ew::store_n<kVec>(yg + c, o);
  }
}

// Per group: dscale = Σ dy·∂x̂/∂scale and the tie counts of max/min (team sums), then dγ/dβ and,
// when dx != nullptr, dx = dy·in + dxmax/#argmax·[x = xmax] + dxmin/#argmin·[x = xmin].
template <typename T, int kVec, int kTeam>
__global__ void fake_quant_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                           const float* __restrict__ gamma, const float* __restrict__ beta,
                                           float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t groups,
                                           int n, Levels L) {
  __shared__ float smem[32 * 3];
  const int64_t k = Team<kTeam>::group();
  const bool valid = k < groups;
  const int64_t off = (valid ? k : 0) * static_cast<int64_t>(n);
  const T* xg = x + off;
  const T* gg = dy + off;
  float xmax, xmin;
  group_min_max<T, kVec, kTeam>(xg, n, valid, smem, xmax, xmin);
  GroupState s{};
  if (valid) s = group_state(xmax, xmin, gamma, beta, k, L);

  float acc[3] = {0.0f, 0.0f, 0.0f};  // dscale, #(x == xmax), #(x == xmin) (exact up to 2^24)
  if (valid) {
    for (int c = Team<kTeam>::lane() * kVec; c < n; c += Team<kTeam>::size() * kVec) {
      float v[kVec], g[kVec];
      ew::load_n<kVec>(xg + c, v);
      ew::load_n<kVec>(gg + c, g);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const ElemQ e = quantize(v[i], s, L);
        acc[0] += g[i] * (e.in ? e.t - e.u : e.q - s.zp);
        acc[1] += v[i] == xmax ? 1.0f : 0.0f;
        acc[2] += v[i] == xmin ? 1.0f : 0.0f;
      }
    }
  }
  team_reduce<kTeam, 3>(acc, SumOp{}, smem);
  if (!valid) return;

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
  float dxmax = dhi, dxmin = dlo;
  if (gamma) {
    dxmax = dhi * s.a;
    dxmin = dlo * s.b;
    if (Team<kTeam>::lane() == 0) {
      dgamma[k] = (dhi * s.xmax) * ((1.0f - s.a) * s.a);
      dbeta[k] = (dlo * s.xmin) * ((1.0f - s.b) * s.b);
    }
  }
  if (!dx) return;
  const float share_max = dxmax / acc[1], share_min = dxmin / acc[2];
  T* dxg = dx + off;
  for (int c = Team<kTeam>::lane() * kVec; c < n; c += Team<kTeam>::size() * kVec) {
    float v[kVec], g[kVec], o[kVec];
    ew::load_n<kVec>(xg + c, v);
    ew::load_n<kVec>(gg + c, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const ElemQ e = quantize(v[i], s, L);
      float d = e.in ? g[i] : 0.0f;
      d = __fadd_rn(d, v[i] == xmax ? share_max : 0.0f);
      d = __fadd_rn(d, v[i] == xmin ? share_min : 0.0f);
      o[i] = d;
    }
    ew::store_n<kVec>(dxg + c, o);
  }
}

// y = sign(s)·max(|s|, floor), sign(0) = +1 (NaN stays NaN).
template <typename T>
__global__ void abs_floor_kernel(const T* __restrict__ s, T* __restrict__ y, int64_t n, float floor) {
  for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) {
    float v = to_f32(s[i]);
    if (fabsf(v) < floor) v = v < 0.0f ? -floor : floor;
    y[i] = from_f32<T>(v);
  }
}

// =============================================================================================
// kernel launchers
// =============================================================================================

constexpr int kTeamBlock = 256;     // threads per block when warp teams own the groups
constexpr int kMaxTeamVectors = 256;  // groups of up to this many vectors go to warp teams

Levels make_levels(const GroupQuantParams& p) {
  Levels L;
  L.symmetric = p.symmetric;
  if (p.symmetric) {
    L.qlo = -static_cast<float>(1 << (p.bits - 1));
    L.qhi = static_cast<float>((1 << (p.bits - 1)) - 1);
  } else {
    L.qlo = 0.0f;
    L.qhi = static_cast<float>((1 << p.bits) - 1);
  }
  L.qdiv = L.qhi;
  return L;
}

struct GroupLaunch {
  int team;  // 4, 8, 16, 32 lanes, or 0 = the whole block
  bool vec;  // 16-byte accesses
  dim3 grid, block;
};

// 16-byte accesses need the group length to be a multiple of the pack and 16-byte aligned pointers.
GroupLaunch group_launch(int64_t groups, int64_t n, DType dt, std::initializer_list<const void*> ptrs,
                         const char* op) {
  OMNIQ_CHECK(n < (int64_t{1} << 31), "%s: group of %lld elements is too long", op, static_cast<long long>(n));
  GroupLaunch l;
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(dt));
  l.vec = n % pack == 0;
  for (const void* p : ptrs)
    if (p && !ew::aligned16(p)) l.vec = false;
  const int64_t nvec = l.vec ? n / pack : n;
  if (nvec <= kMaxTeamVectors) {
    l.team = 32;
    while (l.team > 4 && l.team > nvec) l.team >>= 1;  // short groups: fewer lanes, more groups per warp
    const int64_t per_block = kTeamBlock / l.team;
    const int64_t blocks = (groups + per_block - 1) / per_block;
    OMNIQ_CHECK(blocks < (int64_t{1} << 31), "%s: %lld groups is more than one launch handles", op,
                static_cast<long long>(groups));
    l.block = dim3(kTeamBlock);
    l.grid = dim3(static_cast<unsigned int>(blocks));
  } else {
    OMNIQ_CHECK(groups < (int64_t{1} << 31), "%s: %lld groups is more than one launch handles", op,
                static_cast<long long>(groups));
    l.team = 0;
    l.block = dim3(nvec <= 2048 ? 256 : 512);
    l.grid = dim3(static_cast<unsigned int>(groups));
  }
  return l;
}

// Calls f(T*, vec_width_constant, team_constant) for the dtype and the launch's layout.
template <typename F>
void with_layout(DType dt, const GroupLaunch& l, const char* op, F&& f) {
  ew::dispatch_f32_bf16(dt, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto with_team = [&](auto vec_c) {
      switch (l.team) {
        case 4: f(static_cast<T*>(nullptr), vec_c, std::integral_constant<int, 4>{}); break;
        case 8: f(static_cast<T*>(nullptr), vec_c, std::integral_constant<int, 8>{}); break;
        case 16: f(static_cast<T*>(nullptr), vec_c, std::integral_constant<int, 16>{}); break;
        case 32: f(static_cast<T*>(nullptr), vec_c, std::integral_constant<int, 32>{}); break;
        default: f(static_cast<T*>(nullptr), vec_c, std::integral_constant<int, 0>{}); break;
      }
    };
    if (l.vec) with_team(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
    else with_team(std::integral_constant<int, 1>{});
  });
}

}  // namespace

void fake_quant_groups_forward(const Tensor& x, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                               Tensor& y) {
  const char* op = "fake_quant_forward";
  const int64_t n = p.group, groups = x.numel() / n;
  const GroupLaunch l = group_launch(groups, n, x.dtype(), {x.data(), y.data()}, op);
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(x.device());
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  with_layout(x.dtype(), l, op, [&](auto* tp, auto vec_c, auto team_c) {
    using T = std::remove_pointer_t<decltype(tp)>;
    fake_quant_forward_kernel<T, decltype(vec_c)::value, decltype(team_c)::value>
        <<<l.grid, l.block, 0, ctx.stream>>>(x.data_as<const T>(), y.data_as<T>(), gp, bp, groups,
                                             static_cast<int>(n), L);
    CUDA_CHECK_LAUNCH();
  });
}

void fake_quant_groups_backward(const Tensor& dy, const Tensor& x, const GroupQuantParams& p, const Tensor* gamma,
                                const Tensor* beta, Tensor* dx, Tensor* dgamma, Tensor* dbeta) {
  const char* op = "fake_quant_backward";
  const int64_t n = p.group, groups = x.numel() / n;
  const GroupLaunch l =
      group_launch(groups, n, x.dtype(), {x.data(), dy.data(), dx ? dx->data() : nullptr}, op);
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(x.device());
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  // dγ/dβ are written whenever LWC is on; the kernel needs somewhere to put them.
  OMNIQ_CHECK(!gamma || (dgamma && dbeta), "%s: LWC backward needs dgamma and dbeta outputs", op);
  float* dgp = dgamma ? dgamma->data_as<float>() : nullptr;
  float* dbp = dbeta ? dbeta->data_as<float>() : nullptr;
  with_layout(x.dtype(), l, op, [&](auto* tp, auto vec_c, auto team_c) {
    using T = std::remove_pointer_t<decltype(tp)>;
    fake_quant_backward_kernel<T, decltype(vec_c)::value, decltype(team_c)::value>
        <<<l.grid, l.block, 0, ctx.stream>>>(dy.data_as<const T>(), x.data_as<const T>(),
                                             dx ? dx->data_as<T>() : nullptr, gp, bp, dgp, dbp, groups,
                                             static_cast<int>(n), L);
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
