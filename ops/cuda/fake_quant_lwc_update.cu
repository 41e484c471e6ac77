// CUDA fused LWC step (ops/fake_quant_lwc_update.h): per group, the fake-quant backward's dγ/dβ,
// AdamW on γ, β, m, v and the next step's ŵ, in one pass over w and dŴ. The per-group device code is
// in fake_quant_lwc_update.cuh; this file has the register kernel (any dtype, any group length) and
// the launcher, which prefers the streaming kernel (fake_quant_lwc_update_stream.cu) for 16-bit
// weights in 16-byte vectors — the training step's case (f16 w, bf16 dŴ, bf16 ŵ) — in warp teams (g128)
// and in 512-thread block teams (rows of 8193..16384 elements); shorter per-channel rows measured faster
// here (H100, bench_lwc_update).
//
// Geometry: exactly the unfused backward's (group_launch(..., backward = true) with the same pointers
// deciding the access width), so every thread sums the same elements in the same order and dγ/dβ are
// bitwise those of fake_quant_weight_backward (whose 16-bit case runs the streaming backward with the
// same mapping). Warp teams of 4..32 lanes for groups of ≤ 256 vectors (g128: 16 vectors of 8 f16,
// teams of 4 lanes, 64 groups per 256-thread block); a block team of 128..512 threads for longer
// rows (per-channel 4096: 512 vectors, 128 threads; 11008: 1376 vectors, 512 threads).
// Napkin math (H100, 3.35 TB/s), LLaMA-7B block = 202 M weights, f16 w, bf16 dŴ and ŵ:
// 2 + 2 + 2 = 6 bytes/weight = 1.21 GB ≈ 0.36 ms at peak, where the unfused forward + backward move
// 8 bytes/weight (1.62 GB, 0.66 ms measured at 66–72% of peak).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "ops/cuda/fake_quant_common.cuh"
#include "ops/cuda/fake_quant_group.cuh"
#include "ops/cuda/fake_quant_lwc_update.cuh"
#include "ops/fake_quant_lwc_update.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace fq;

// ==== CUDA kernels ===========================================================================

// One tile (blockIdx.x) of group_launch's geometry: every thread loads its vectors of x and dy into
// registers (all loads in flight at once, as fake_quant_backward_kernel), and its lane parameter.
// Register cap as the unfused v1/v2 backward: 128 (512-thread block teams still fit an SM).
template <typename TX, typename TG, typename TY, int kVec>
__global__ void __maxnreg__(128)
    fake_quant_lwc_update_kernel(const TG* __restrict__ dy, const TX* __restrict__ x, TY* __restrict__ y,
                                 LwcOptPtrs o, int64_t groups, int n, int team, Levels L) {
  constexpr int kItems = cache_items<kVec, true>();
  __shared__ float smem[32 * 2];
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
  const float p = lane_param(o)[t.k], m = lane_m(o)[t.k], v = lane_v(o)[t.k];  // t.k is valid even for a tail
  lwc_update_group<kItems, TX, TG, TY, kVec>(t, xg, gg, y + t.off, xr, gr, p, m, v, o, n, L, smem);
}

template <typename TX, typename TG, typename TY>
void launch(const GroupLaunch& l, const Tensor& dy, const Tensor& w, Tensor& w_hat, const LwcOptPtrs& o,
            int64_t groups, int n, const Levels& L, CudaContext& ctx) {
  const TG* g = dy.data_as<const TG>();
  const TX* x = w.data_as<const TX>();
  TY* y = w_hat.data_as<TY>();
  if (l.vec) {
    constexpr int kVec = static_cast<int>(16 / sizeof(TX));
    if constexpr (sizeof(TX) == 2) {
      // OMNIQ_FQ_V2_OLD=1 (the unfused backward's A/B switch for its streaming kernel) runs the
      // register kernel here too.
      if (!fq_v2_old_requested() && launch_lwc_update_stream<TX, TG, TY>(l, g, x, y, o, groups, n, L, ctx)) return;
    }
    fake_quant_lwc_update_kernel<TX, TG, TY, kVec>
        <<<l.grid, l.block, 0, ctx.stream>>>(g, x, y, o, groups, n, l.team, L);
  } else {
    fake_quant_lwc_update_kernel<TX, TG, TY, 1><<<l.grid, l.block, 0, ctx.stream>>>(g, x, y, o, groups, n, l.team, L);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// ==== kernel launcher ========================================================================

void fake_quant_lwc_update(const Tensor& dy_in, const Tensor& w, const GroupQuantParams& p, const LwcAdamWState& s,
                           Tensor& w_hat) {
  const char* op = "fake_quant_lwc_update";
  // Kernels exist for dy in w_hat's dtype (the dW GEMM's output for a ŵ it multiplied) and in f32
  // (OMNIQ_F32_WEIGHT_GRADS=1); any other float dy is read through an f32 copy: the same values
  // (16-bit → f32 is exact), one extra pass.
  const bool dy_direct = dy_in.dtype() == w_hat.dtype() || dy_in.dtype() == DType::f32;
  const Tensor dy_f32 = dy_direct ? Tensor() : dy_in.to(DType::f32);
  const Tensor& dy = dy_direct ? dy_in : dy_f32;
  const int64_t n = p.group, groups = w.numel() / n;
  // The unfused backward's geometry: its pointers (x, the caller's dy) decide the access width.
  const GroupLaunch l = group_launch(groups, n, w.dtype(),
                                     {{w.data(), w.dtype()}, {dy_in.data(), dy_in.dtype()}, {dy.data(), dy.dtype()}},
                                     true, op);
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(w.dtype()));
  OMNIQ_CHECK(!l.vec || pack_ok(w_hat.data(), w_hat.dtype(), pack),
              "%s: w_hat %s must be aligned to %lld elements (allocate it with Tensor::empty)", op,
              w_hat.str().c_str(), static_cast<long long>(pack));
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(w.device());
  LwcOptPtrs o;
  o.gamma = s.gamma->data_as<float>();
  o.beta = s.beta->data_as<float>();
  o.m_gamma = s.m_gamma->data_as<float>();
  o.v_gamma = s.v_gamma->data_as<float>();
  o.m_beta = s.m_beta->data_as<float>();
  o.v_beta = s.v_beta->data_as<float>();
  o.scalars = reinterpret_cast<const omniq::detail::AdamWScalars*>(s.scalars->data());
  o.slot_gamma = static_cast<int>(s.slot_gamma);
  o.slot_beta = static_cast<int>(s.slot_beta);
  const bool dy_f32_kernel = dy.dtype() == DType::f32;
  dispatch_float(w.dtype(), op, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_float(w_hat.dtype(), op, [&](auto yt) {
      using TY = typename decltype(yt)::type;
      if (dy_f32_kernel) launch<TX, float, TY>(l, dy, w, w_hat, o, groups, static_cast<int>(n), L, ctx);
      else launch<TX, TY, TY>(l, dy, w, w_hat, o, groups, static_cast<int>(n), L, ctx);
    });
  });
}

}  // namespace omniq::cuda
