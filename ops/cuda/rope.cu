// CUDA RoPE (see rope.h for the convention). One thread per rotated pair (b, t, h, i), grid-stride;
// a warp covers 32 consecutive i of one head, so both halves are read and written coalesced.
//
// The D/2 inverse frequencies are computed once on the host (rope_inv_freq, the same fp32 values the
// CPU reference uses) and passed by value as a __grid_constant__ kernel parameter, so no upload or
// synchronisation is needed; each block copies them to shared memory because the threads of a warp
// read different entries (constant-bank reads would serialise).
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

template <typename T>
__global__ void rope_kernel(const T* x, T* out, int64_t pairs, int64_t T_len, int64_t H, int64_t half,
                            int64_t pos_offset, float sign, const __grid_constant__ RopeFreqs freqs) {
  __shared__ float inv[kRopeMaxHeadDim / 2];
  for (int64_t k = threadIdx.x; k < half; k += blockDim.x) inv[k] = freqs.inv[k];
  __syncthreads();
  for (int64_t idx = ew::thread_index(); idx < pairs; idx += ew::thread_count()) {
    const int64_t i = idx % half;
    const int64_t row = idx / half;  // (b * T + t) * H + h
    const int64_t t = (row / H) % T_len;
    const float angle = __fmul_rn(static_cast<float>(pos_offset + t), inv[i]);  // fp32 product, as HF
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = round_like<T>(static_cast<float>(cd));
    const float s = sign * round_like<T>(static_cast<float>(sd));
    const int64_t base = row * 2 * half;
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
  ew::dispatch_f32_bf16(x.dtype(), inverse ? "rope_backward" : "rope_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    rope_kernel<T><<<ew::stride_grid(pairs, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(x.data()), out.data_as<T>(), pairs, T_len, H, half, pos_offset, inverse ? -1.0f : 1.0f,
        freqs);
    CUDA_CHECK_LAUNCH();
  });
  return out;
}

}  // namespace omniq::cuda
