// CUDA RoPE (see rope.h for the convention). A (cos, sin) table [positions, D/2] of float2, then a
// memory-bound apply kernel.
//
// The table depends only on (device, D, theta, dtype) and the position, not on the batch, the heads,
// the direction (backward rotates by -angle: the sign is applied in the apply kernel, exact) or the
// call: it is computed once per key for positions [0, P) and cached (see TableCache below), so a
// training step's four RoPE calls (q and k, forward and backward) launch no table kernel after the
// first step, and need no allocation or host synchronisation (CUDA-graph capture friendly).
//
// The D/2 inverse frequencies are computed on the host (rope_inv_freq, the same fp32 values the CPU
// reference uses) and passed by value as a __grid_constant__ kernel parameter, so no upload or
// synchronisation is needed.
// cos/sin: evaluated in double at the fp32 angle and rounded to fp32 (the value an ideal fp32 cos
// returns), then to bf16 for bf16 inputs as HF's cos.to(x.dtype). The CPU does the same, so both
// backends see identical c, s.
//
// Apply: each thread owns 16 bytes (8 bf16 / 4 f32) of the first half of a head and the matching 16
// bytes of the second half, for kHeads heads of one token, so the 16-byte table slice it needs is
// read once for kHeads heads. Napkin math: bf16 [2048, 32, 128] is 16 MB in + 16 MB out, ~10 us at
// ~3.3 TB/s; the old one-pair-per-thread kernel (2-byte accesses, a table read per pair) reached
// ~33% of DRAM peak. Odd layouts (D/2 not a multiple of the pack, unaligned views) take that
// per-pair kernel, which computes every element with the same float operations (bitwise equal).
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/rope.h"

namespace omniq::cuda {

namespace {

using ew::from_f32;
using ew::to_f32;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

struct RopeFreqs {
  float inv[kRopeMaxHeadDim / 2];  // 2 KB: within the 4 KB kernel-parameter limit
};

template <typename T>
__device__ __forceinline__ float round_like(float v) {
  return to_f32(from_f32<T>(v));  // identity for f32, round-to-nearest-even for bf16
}

// cs[k * half + i] = (c, s) of position pos0 + k, frequency i, rounded like T (HF's cos.to(dtype)).
// One double sincos per entry: fine for a table computed once.
template <typename T>
__global__ void rope_table_kernel(float2* cs, int64_t n, int64_t half, int64_t pos0,
                                  const __grid_constant__ RopeFreqs freqs) {
  for (int64_t idx = ew::thread_index(); idx < n; idx += ew::thread_count()) {
    const int64_t i = idx % half, k = idx / half;
    const float angle = __fmul_rn(static_cast<float>(pos0 + k), freqs.inv[i]);  // fp32 product, as HF
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    cs[idx] = make_float2(round_like<T>(static_cast<float>(cd)), round_like<T>(static_cast<float>(sd)));
  }
}

// The rotation of one pair; _rn intrinsics: no FMA contraction, so the result is bitwise the CPU
// reference's. s already carries the direction's sign (sign · s is exact).
__device__ __forceinline__ void rotate(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// Fallback: one thread per rotated pair (b, t, h, i); token t reads table row t + row0.
template <typename T, typename I>
__global__ void rope_apply_kernel(const T* x, T* out, const float2* __restrict__ cs, I pairs, I T_len, I H, I half,
                                  I row0, float sign) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < pairs;
       idx += static_cast<I>(gridDim.x) * blockDim.x) {
    const I i = idx % half;
    const I row = idx / half;  // (b * T + t) * H + h
    const I t = (row / H) % T_len;
    const float2 v = cs[(t + row0) * half + i];
    const I base = row * 2 * half;
    float o1, o2;
    rotate(to_f32(x[base + i]), to_f32(x[base + i + half]), v.x, sign * v.y, o1, o2);
    out[base + i] = from_f32<T>(o1);
    out[base + i + half] = from_f32<T>(o2);
  }
}

constexpr int kHeadsPerThread = 4;

// Work item (b·T + t, head group g, chunk j): elements [j·kVec, (j+1)·kVec) of both halves of heads
// g·kHeads ... g·kHeads + kHeads - 1 of token t. Consecutive threads take consecutive chunks, so a
// warp reads whole 32-byte sectors. All loads of an item are issued before any math (memory-level
// parallelism: 2·kHeads 16-byte loads in flight per thread). Needs half % kVec == 0 and 16-byte
// aligned x/out (the launcher checks).
template <typename T, typename I>
__device__ __forceinline__ void rope_vec_item(const T* __restrict__ x, T* __restrict__ out,
                                              const float2* __restrict__ cs, I idx, I chunks, I groups, I H, I T_len,
                                              I half, I row0, float sign) {
  constexpr int kVec = 16 / sizeof(T);
  const I j = idx % chunks;
  const I rest = idx / chunks;
  const I g = rest % groups;
  const I bt = rest / groups;  // b * T + t
  const I t = bt % T_len;
  const I i0 = j * kVec;
  float c[kVec], s[kVec];
  const float4* tp = reinterpret_cast<const float4*>(cs + (t + row0) * half + i0);
#pragma unroll
  for (int q = 0; q < kVec / 2; ++q) {
    const float4 v = tp[q];  // (c, s) of frequencies i0 + 2q and i0 + 2q + 1
    c[2 * q] = v.x;
    s[2 * q] = sign * v.y;
    c[2 * q + 1] = v.z;
    s[2 * q + 1] = sign * v.w;
  }
  // Raw 16-byte packs (4 registers each), converted when used: half the registers of fp32 copies.
  uint4 r1[kHeadsPerThread], r2[kHeadsPerThread];
#pragma unroll
  for (int k = 0; k < kHeadsPerThread; ++k) {
    const I h = g * kHeadsPerThread + k;
    if (h < H) {
      const I base = (bt * H + h) * 2 * half + i0;
      r1[k] = *reinterpret_cast<const uint4*>(x + base);
      r2[k] = *reinterpret_cast<const uint4*>(x + base + half);
    }
  }
#pragma unroll
  for (int k = 0; k < kHeadsPerThread; ++k) {
    const I h = g * kHeadsPerThread + k;
    if (h < H) {
      const T* x1 = reinterpret_cast<const T*>(&r1[k]);
      const T* x2 = reinterpret_cast<const T*>(&r2[k]);
      float o1[kVec], o2[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) rotate(to_f32(x1[e]), to_f32(x2[e]), c[e], s[e], o1[e], o2[e]);
      const I base = (bt * H + h) * 2 * half + i0;
      ew::store_n<kVec>(out + base, o1);
      ew::store_n<kVec>(out + base + half, o2);
    }
  }
}

template <typename T, typename I>
__global__ void rope_apply_vec_kernel(const T* __restrict__ x, T* __restrict__ out, const float2* __restrict__ cs,
                                      I items, I chunks, I groups, I H, I T_len, I half, I row0, float sign) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items;
       idx += static_cast<I>(gridDim.x) * blockDim.x)
    rope_vec_item<T, I>(x, out, cs, idx, chunks, groups, H, T_len, half, row0, sign);
}

// q and k of one attention in one launch (rope_qk): the work items of q, then those of k, each
// exactly rope_apply_vec_kernel's item (same loads, same math, same bits); only the head count
// (and so the head groups) differs between the two (GQA). Saves a launch and a ramp/tail per call.
template <typename T, typename I>
__global__ void rope_apply_vec_qk_kernel(const T* __restrict__ q, T* __restrict__ q_out, I q_items, I q_groups, I Hq,
                                         const T* __restrict__ k, T* __restrict__ k_out, I k_items, I k_groups, I Hk,
                                         const float2* __restrict__ cs, I chunks, I T_len, I half, I row0,
                                         float sign) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < q_items + k_items;
       idx += static_cast<I>(gridDim.x) * blockDim.x) {
    const bool is_q = idx < q_items;  // selects, not branches: one copy of the item's code
    rope_vec_item<T, I>(is_q ? q : k, is_q ? q_out : k_out, cs, is_q ? idx : idx - q_items, chunks,
                        is_q ? q_groups : k_groups, is_q ? Hq : Hk, T_len, half, row0, sign);
  }
}

// ---------------------------------------------------------------------------------------------
// The table cache

// Largest cached table (per key); longer position ranges get a per-call table of just their rows.
// 64 MB is 128K positions at D = 128.
constexpr int64_t kMaxCachedTableBytes = int64_t{64} << 20;

struct TableKey {
  int device;
  int64_t half;
  uint32_t theta_bits;
  DType dtype;
  bool operator<(const TableKey& o) const {
    if (device != o.device) return device < o.device;
    if (half != o.half) return half < o.half;
    if (theta_bits != o.theta_bits) return theta_bits < o.theta_bits;
    return static_cast<int>(dtype) < static_cast<int>(o.dtype);
  }
};

struct CachedTable {
  Tensor cs;              // float2 [positions, half] for positions [0, positions)
  int64_t positions = 0;
  // Tables replaced by a longer one stay allocated: a captured CUDA graph may hold their address.
  std::vector<Tensor> retired;
};

// Never destroyed: tables must not be freed during static destruction, after the CUDA context and
// its memory pool may be gone (a few MB at exit are reclaimed with the process).
std::mutex& cache_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
std::map<TableKey, CachedTable>& cache() {
  static auto* c = new std::map<TableKey, CachedTable>;
  return *c;
}

RopeFreqs freqs_of(int64_t D, float theta) {
  RopeFreqs f{};
  const std::vector<float> inv = rope_inv_freq(D, theta);
  for (int64_t k = 0; k < D / 2; ++k) f.inv[k] = inv[k];
  return f;
}

// Queues the table of positions [pos0, pos0 + n_pos) into a new tensor.
Tensor make_table(const Tensor& x, int64_t D, float theta, int64_t pos0, int64_t n_pos, CudaContext& ctx) {
  const int64_t half = D / 2;
  Tensor table = Tensor::empty({n_pos * half * 2}, DType::f32, x.device());
  const RopeFreqs freqs = freqs_of(D, theta);
  ew::dispatch_f32_bf16(x.dtype(), "rope", [&](auto tt) {
    using T = typename decltype(tt)::type;
    rope_table_kernel<T><<<ew::stride_grid(n_pos * half, ctx), ew::kBlock, 0, ctx.stream>>>(
        reinterpret_cast<float2*>(table.data_as<float>()), n_pos * half, half, pos0, freqs);
    CUDA_CHECK_LAUNCH();
  });
  return table;
}

bool stream_is_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  return st != cudaStreamCaptureStatusNone;
}

// The table rows for positions [pos_offset, pos_offset + T_len): from the cache (row0 = pos_offset,
// nothing queued on a hit), or, while the stream is being captured into a CUDA graph and the cache
// would have to grow, or when the range is too long to cache, a per-call table in `temp` (row0 = 0):
// a table allocated during capture belongs to the graph and must not outlive it.
const float2* table_for(const Tensor& x, int64_t D, float theta, int64_t pos_offset, int64_t T_len, CudaContext& ctx,
                        Tensor& temp, int64_t& row0) {
  const int64_t half = D / 2, needed = pos_offset + T_len;
  const int64_t max_positions = kMaxCachedTableBytes / (half * 8);
  uint32_t theta_bits;
  static_assert(sizeof(theta_bits) == sizeof(theta), "fp32 theta");
  std::memcpy(&theta_bits, &theta, sizeof(theta));
  const TableKey key{x.device().index, half, theta_bits, x.dtype()};
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache().find(key);
    if (it != cache().end() && it->second.positions >= needed) {
      row0 = pos_offset;
      return reinterpret_cast<const float2*>(it->second.cs.data_as<float>());
    }
    if (needed <= max_positions && !stream_is_capturing(ctx.stream)) {
      CachedTable& e = cache()[key];
      int64_t p = 4096;  // grow geometrically: a decode loop with rising offsets rebuilds log(n) times
      while (p < needed) p *= 2;
      p = std::min(std::max(p, 2 * e.positions), max_positions);
      if (e.cs.defined()) e.retired.push_back(std::move(e.cs));
      e.cs = make_table(x, D, theta, 0, p, ctx);
      e.positions = p;
      row0 = pos_offset;
      return reinterpret_cast<const float2*>(e.cs.data_as<float>());
    }
  }
  temp = make_table(x, D, theta, pos_offset, T_len, ctx);
  row0 = 0;
  return reinterpret_cast<const float2*>(temp.data_as<float>());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

Tensor rope(const Tensor& x, float theta, int64_t pos_offset, bool inverse) {
  const int64_t B = x.size(0), T_len = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t pairs = B * T_len * H * half;
  if (pairs == 0) return out;
  CudaContext& ctx = cuda_context(x.device());
  Tensor temp;
  int64_t row0 = 0;
  const float2* cs = table_for(x, D, theta, pos_offset, T_len, ctx, temp, row0);
  const float sign = inverse ? -1.0f : 1.0f;
  // Every element index and every table index (row0 + T_len rows of half entries) fits in 32 bits.
  const bool small = 2 * pairs < (int64_t{1} << 31) && (row0 + T_len) * half < (int64_t{1} << 31);
  ew::dispatch_f32_bf16(x.dtype(), inverse ? "rope_backward" : "rope_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    constexpr int64_t kVec = 16 / sizeof(T);
    const T* xp = static_cast<const T*>(x.data());
    T* op = out.data_as<T>();
    if (half % kVec == 0 && ew::aligned16(xp) && ew::aligned16(op)) {
      const int64_t chunks = half / kVec, groups = (H + kHeadsPerThread - 1) / kHeadsPerThread;
      const int64_t items = B * T_len * groups * chunks;
      const unsigned int grid = ew::stride_grid(items, ctx);
      if (small) {
        rope_apply_vec_kernel<T, uint32_t><<<grid, ew::kBlock, 0, ctx.stream>>>(
            xp, op, cs, static_cast<uint32_t>(items), static_cast<uint32_t>(chunks), static_cast<uint32_t>(groups),
            static_cast<uint32_t>(H), static_cast<uint32_t>(T_len), static_cast<uint32_t>(half),
            static_cast<uint32_t>(row0), sign);
      } else {
        rope_apply_vec_kernel<T, int64_t><<<grid, ew::kBlock, 0, ctx.stream>>>(xp, op, cs, items, chunks, groups, H,
                                                                               T_len, half, row0, sign);
      }
    } else if (small) {
      rope_apply_kernel<T, uint32_t><<<ew::stride_grid(pairs, ctx), ew::kBlock, 0, ctx.stream>>>(
          xp, op, cs, static_cast<uint32_t>(pairs), static_cast<uint32_t>(T_len), static_cast<uint32_t>(H),
          static_cast<uint32_t>(half), static_cast<uint32_t>(row0), sign);
    } else {
      rope_apply_kernel<T, int64_t><<<ew::stride_grid(pairs, ctx), ew::kBlock, 0, ctx.stream>>>(
          xp, op, cs, pairs, T_len, H, half, row0, sign);
    }
    CUDA_CHECK_LAUNCH();
  });
  return out;  // temp (if any) is freed stream-ordered, after the kernel
}

RopeQk rope_qk(const Tensor& q, const Tensor& k, float theta, int64_t pos_offset, bool inverse) {
  const int64_t B = q.size(0), T_len = q.size(1), Hq = q.size(2), Hk = k.size(2), D = q.size(3), half = D / 2;
  const int64_t q_pairs = B * T_len * Hq * half, k_pairs = B * T_len * Hk * half;
  const int64_t pack = 16 / static_cast<int64_t>(dtype_size(q.dtype()));
  // The one-launch kernel covers the vectorised layout only; anything else (odd D/2, unaligned views,
  // an empty tensor) takes two rope() calls, whose kernels give the same bits.
  if (q.dtype() != DType::f32 && q.dtype() != DType::bf16) {
    return {rope(q, theta, pos_offset, inverse), rope(k, theta, pos_offset, inverse)};
  }
  RopeQk out{Tensor::empty(q.shape(), q.dtype(), q.device()), Tensor::empty(k.shape(), k.dtype(), k.device())};
  const bool vec = half % pack == 0 && ew::aligned16(q.data()) && ew::aligned16(k.data()) &&
                   ew::aligned16(out.q.data()) && ew::aligned16(out.k.data());
  if (!vec || q_pairs == 0 || k_pairs == 0) {
    return {rope(q, theta, pos_offset, inverse), rope(k, theta, pos_offset, inverse)};
  }
  CudaContext& ctx = cuda_context(q.device());
  Tensor temp;
  int64_t row0 = 0;
  const float2* cs = table_for(q, D, theta, pos_offset, T_len, ctx, temp, row0);
  const float sign = inverse ? -1.0f : 1.0f;
  const int64_t chunks = half / pack;
  const int64_t q_groups = (Hq + kHeadsPerThread - 1) / kHeadsPerThread;
  const int64_t k_groups = (Hk + kHeadsPerThread - 1) / kHeadsPerThread;
  const int64_t q_items = B * T_len * q_groups * chunks, k_items = B * T_len * k_groups * chunks;
  // As rope(): every element index, table index and (here) the item count fit in 32 bits.
  const bool small = 2 * std::max(q_pairs, k_pairs) < (int64_t{1} << 31) &&
                     (row0 + T_len) * half < (int64_t{1} << 31) && q_items + k_items < (int64_t{1} << 31);
  const unsigned int grid = ew::stride_grid(q_items + k_items, ctx);
  ew::dispatch_f32_bf16(q.dtype(), inverse ? "rope_backward_qk" : "rope_forward_qk", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* qp = static_cast<const T*>(q.data());
    const T* kp = static_cast<const T*>(k.data());
    if (small) {
      using I = uint32_t;
      rope_apply_vec_qk_kernel<T, I><<<grid, ew::kBlock, 0, ctx.stream>>>(
          qp, out.q.data_as<T>(), static_cast<I>(q_items), static_cast<I>(q_groups), static_cast<I>(Hq), kp,
          out.k.data_as<T>(), static_cast<I>(k_items), static_cast<I>(k_groups), static_cast<I>(Hk), cs,
          static_cast<I>(chunks), static_cast<I>(T_len), static_cast<I>(half), static_cast<I>(row0), sign);
    } else {
      rope_apply_vec_qk_kernel<T, int64_t><<<grid, ew::kBlock, 0, ctx.stream>>>(
          qp, out.q.data_as<T>(), q_items, q_groups, Hq, kp, out.k.data_as<T>(), k_items, k_groups, Hk, cs, chunks,
          T_len, half, row0, sign);
    }
    CUDA_CHECK_LAUNCH();
  });
  return out;  // temp (if any) is freed stream-ordered, after the kernel
}

}  // namespace omniq::cuda
