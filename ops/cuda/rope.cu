// CUDA RoPE (see rope.h for the convention). A (cos, sin) table per (t, i), then one thread per
// rotated pair (b, t, h, i), grid-stride; a warp covers 32 consecutive i of one head, so both halves
// are read and written coalesced.
//
// The D/2 inverse frequencies are computed once on the host (rope_inv_freq, the same fp32 values the
// CPU reference uses) and passed by value as a __grid_constant__ kernel parameter, so no upload or
// synchronisation is needed.
// cos/sin: evaluated in double at the fp32 angle and rounded to fp32 (the value an ideal fp32 cos
// returns), then to bf16 for bf16 inputs as HF's cos.to(x.dtype). The CPU does the same, so both
// backends see identical c, s. One double sincos per pair is cheap next to the memory traffic.
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

// cos/sin depend on (t, i) only, not on the batch or head: one table [T, D/2] of (c, sign·s) per call
// (rounded like T, so the values are exactly the ones the per-pair kernel used to compute), then a
// memory-bound apply kernel with 32-bit index math. The double sincos per pair and the 64-bit
// divisions made the per-pair version ~5x slower than its memory traffic (ncu: 11% of DRAM peak).
template <typename T>
__global__ void rope_table_kernel(float2* cs, int64_t n, int64_t half, int64_t pos_offset, float sign,
                                  const __grid_constant__ RopeFreqs freqs) {
  for (int64_t idx = ew::thread_index(); idx < n; idx += ew::thread_count()) {
    const int64_t i = idx % half, t = idx / half;
    const float angle = __fmul_rn(static_cast<float>(pos_offset + t), freqs.inv[i]);  // fp32 product, as HF
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    cs[idx] = make_float2(round_like<T>(static_cast<float>(cd)), sign * round_like<T>(static_cast<float>(sd)));
  }
}

template <typename T, typename I>
__global__ void rope_apply_kernel(const T* x, T* out, const float2* __restrict__ cs, I pairs, I T_len, I H, I half) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < pairs;
       idx += static_cast<I>(gridDim.x) * blockDim.x) {
    const I i = idx % half;
    const I row = idx / half;  // (b * T + t) * H + h
    const I t = (row / H) % T_len;
    const float2 v = cs[t * half + i];
    const float c = v.x, s = v.y;
    const I base = row * 2 * half;
    const float x1 = to_f32(x[base + i]), x2 = to_f32(x[base + i + half]);
    // _rn intrinsics: no FMA contraction, so the result is bitwise the CPU reference's.
    out[base + i] = from_f32<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    out[base + i + half] = from_f32<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
  }
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
  RopeFreqs freqs{};
  const std::vector<float> inv = rope_inv_freq(D, theta);
  for (int64_t k = 0; k < half; ++k) freqs.inv[k] = inv[k];
  Tensor table = Tensor::empty({T_len * half * 2}, DType::f32, x.device());
  float2* cs = reinterpret_cast<float2*>(table.data_as<float>());
  const float sign = inverse ? -1.0f : 1.0f;
  ew::dispatch_f32_bf16(x.dtype(), inverse ? "rope_backward" : "rope_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    rope_table_kernel<T><<<ew::stride_grid(T_len * half, ctx), ew::kBlock, 0, ctx.stream>>>(cs, T_len * half, half,
                                                                                          pos_offset, sign, freqs);
    CUDA_CHECK_LAUNCH();
    const T* xp = static_cast<const T*>(x.data());
    if (2 * pairs < (int64_t{1} << 31)) {  // every element index fits in 32 bits
      rope_apply_kernel<T, uint32_t><<<ew::stride_grid(pairs, ctx), ew::kBlock, 0, ctx.stream>>>(
          xp, out.data_as<T>(), cs, static_cast<uint32_t>(pairs), static_cast<uint32_t>(T_len),
          static_cast<uint32_t>(H), static_cast<uint32_t>(half));
    } else {
      rope_apply_kernel<T, int64_t><<<ew::stride_grid(pairs, ctx), ew::kBlock, 0, ctx.stream>>>(
          xp, out.data_as<T>(), cs, pairs, T_len, H, half);
    }
    CUDA_CHECK_LAUNCH();
  });
  return out;
}

}  // namespace omniq::cuda
