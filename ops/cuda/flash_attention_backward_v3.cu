// Flash attention backward, variant 3: Hopper warpgroup MMAs (wgmma, sm_90a), D = 128, bf16/f16.
// Same contract, algorithm, grid, ordered-mode design and launch frame as variant 2
// (flash_attention_backward_v2.cu, read its header first; its launcher runs this kernel when
// variant 3 is selected); what changes is who computes what:
//
// CTA = 128 keys = 2 warpgroups of 64 keys (v2: 8 warps of 16). Per 64-query tile, warpgroup w:
//   Sᵀ  = K_w·Qᵀ, dPᵀ = V_w·dOᵀ      16 wgmma m64n64k16, K/V and Q/dO straight from shared memory
//   Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ⊙ (dPᵀ − δ)   in registers (rows = keys, columns = queries)
//   dV_w += Pᵀ·dO, dK_w += dSᵀ·Q       8 wgmma m64n128k16, Pᵀ / dSᵀ from registers (the accumulators
//                                      packed to 16 bits are the A operand), dO / Q as MN-major B
//   dSᵀ → shared memory (16-bit, swizzled), barrier
//   dQ[:, 64w..64w+63] = dS·K[:, 64w..]  8 wgmma m64n64k16: A = dS read MN-major from the dSᵀ tile,
//                                      B = K's column half w, MN-major
// and dQ leaves as in v2 (fp32 RED, or the ordered store / add / convert of the deterministic mode,
// in ascending key-tile order, so every run gives the same bits; they differ from v2's, whose MMAs
// sum each product in another order). H100, 7B shape: deterministic 0.573–0.578 ms (v2 0.67), atomic
// 0.50. This is the "plain" form (OMNIQ_FLASH_BWD_V3_WS=0); the default is the warp-specialised form
// of flash_attention_backward_v3ws.cu (same products, same bits, 0.40 / 0.37 ms), which hands the dQ
// part to a third warpgroup instead of writing it from the MMA warps. The shared tile layout is ops/cuda/wgmma.cuh's: K and V serve as
// K-major operands (Sᵀ, dPᵀ) and K as MN-major B (dQ) without copies. A warpgroup whose 64 keys all
// lie after the tile's last query (causal) or past the end skips its products and writes zero dSᵀ.
#include <cstdlib>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#include "ops/cuda/flash_attention_backward_v3_tile.cuh"
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;
using bwd3::kDSTile;
using bwd3::kKVTile;
using bwd3::kQTile;

constexpr int kB3Q = bwd3::kQ, kB3D = bwd3::kD, kB3Threads = 256;
// K, V; Q and dO double-buffered; dSᵀ double-buffered; lse, δ; slack to align the tiles to 1024 B.
constexpr size_t kB3Smem = 2 * kKVTile + 4 * kQTile + 2 * kDSTile + 4 * kB3Q * sizeof(float) + 1024;

// The turn waits trap without printing (wait_turn<false>): a printf call anywhere in the kernel makes
// ptxas serialise every wgmma of it (session 8's kernel: 0.597 vs 0.573 ms deterministic, 7B shape).
template <typename E, bool kCausal>
__global__ void __launch_bounds__(kB3Threads, 1)
    flash_bwd_v3_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        const E* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                        float* __restrict__ dq_acc, E* __restrict__ dq, E* __restrict__ dk, E* __restrict__ dv,
                        float* __restrict__ dk32, float* __restrict__ dv32, int* __restrict__ dq_ctr,
                        int* __restrict__ kv_ctr, int seq, int Hq, int Hkv, int splits, float scale,
                        float scale_log2, bool thread_fences) {
#ifdef OMNIQ_WGMMA
  constexpr int D = kB3D;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = wgmma::smem_addr(smem_raw);
  unsigned char* sK = smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u);
  unsigned char* sV = sK + kKVTile;
  unsigned char* sQ = sV + kKVTile;   // [2][kQTile]
  unsigned char* sdO = sQ + 2 * kQTile;  // [2][kQTile]
  unsigned char* sdS = sdO + 2 * kQTile;  // [2][kDSTile]
  float* sL = reinterpret_cast<float*>(sdS + 2 * kDSTile);  // [2][64] lse (natural log), 0 past the end
  float* sDelta = sL + 2 * kB3Q;                             // [2][64]
  const uint32_t aK = wgmma::smem_addr(sK), aV = wgmma::smem_addr(sV), aQ = wgmma::smem_addr(sQ),
                 adO = wgmma::smem_addr(sdO), adS = wgmma::smem_addr(sdS);

  const bwd3::CtaWork w = bwd3::cta_work<kCausal>(seq, Hq, Hkv, splits, dq_ctr != nullptr);
  const bwd3::KeyRows kr = bwd3::key_rows(w.n0);
  const int64_t ldq = static_cast<int64_t>(Hq) * D;
  auto issue = [&](int it, int buf) {
    int h, mt;
    w.coords(it, h, mt);
    bwd3::load_query_tile<E, kB3Threads>(sQ + buf * kQTile, sdO + buf * kQTile, sL + buf * kB3Q, sDelta + buf * kB3Q,
                                         q, dout, lse, delta, w.b, h, mt * kB3Q, seq, Hq);
  };

  bwd3::load_key_tiles<E, kB3Threads>(sK, sV, k, v, w, seq, Hkv);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[64], dv_acc[64];  // this warpgroup's 64 keys x D (wgmma accumulator layout)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  int* pending = nullptr;  // ordered mode: the turn this CTA hands on after the next barrier

  for (int it = 0; it < w.iters; ++it) {
    if (it + 1 < w.iters) issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    wgmma::fence_proxy_async();
    __syncthreads();  // (a) tile `it` visible; every thread's dQ adds of the previous tile precede
                      // thread 0's release of its turn just below
    if (pending != nullptr) {
      if (threadIdx.x == 0) cta_release_increment(pending, thread_fences);
      pending = nullptr;
    }
    const int buf = it & 1;
    int h, mt;
    w.coords(it, h, mt);
    const int m0 = mt * kB3Q;
    bwd3::tile_products<E, kCausal>(dk_acc, dv_acc, aK, aV, aQ + buf * kQTile, adO + buf * kQTile, sL + buf * kB3Q,
                                    sDelta + buf * kB3Q, sdS + buf * kDSTile, kr, m0, seq, scale_log2);
    wgmma::fence_proxy_async();  // the dSᵀ stores → visible to the dQ wgmma after the barrier

    // Ordered mode: key tiles add to query tile (h, mt) in ascending kt; kt = 0 goes first and
    // stores, the last contributor (the tile holding the diagonal, or the last key tile) converts.
    int* turn = w.ordered ? dq_ctr + (static_cast<int64_t>(w.b) * Hq + h) * w.nq + mt : nullptr;
    if (w.ordered && w.kt > 0) wait_turn<false>(turn, w.kt);
    __syncthreads();  // (b) dSᵀ complete (and the turn, if waited for, acquired) for all warps

    float acc[32];
    bwd3::tile_dq<E>(acc, adS + buf * kDSTile, aK, kr.wg);

    const bool last = w.kt == w.last_kt<kCausal>(mt);
    const int mode = dq_mode(w.ordered, w.kt == 0, last);
    const bool odd = kr.tq & 1;
    float* dqa = dq_acc + static_cast<int64_t>(w.b) * seq * ldq + static_cast<int64_t>(h) * D;
    E* dqo = dq + static_cast<int64_t>(w.b) * seq * ldq + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float4 val = lane_pair_row4(acc + 4 * nt, odd);
      const int row = m0 + kr.warp * 16 + kr.gr + (odd ? 8 : 0);
      const int col = kr.wg * 64 + nt * 8 + 2 * (kr.tq & 2);
      if (row < seq) dq_write4<E>(mode, dqa, dqo, static_cast<int64_t>(row) * ldq + col, val, scale);
    }
    if (w.ordered && !last) {
      if (thread_fences) fence_acq_rel_gpu();
      pending = turn;  // handed on after the next barrier (a), as in v2
    }
  }
  if (pending != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) cta_release_increment(pending, thread_fences);
  }

  // Ordered split dK/dV: the splits of one (b, kv head, key tile) add in ascending split order.
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(w.b) * Hkv + w.kvh) * w.nk + w.kt : nullptr;
  kv_turn_begin<false>(kv_turn, w.split);
  bwd3::write_dkdv<E>(dk_acc, dv_acc, dk32, dv32, dk, dv, w, kr, seq, Hkv, scale);
  kv_turn_end(kv_turn, w.split, splits, thread_fences);
#else
  __trap();  // not built for sm_90a: flash_backward_v3_available() keeps the host from launching this
#endif
}

}  // namespace

bool flash_backward_v3_available(const Tensor& q) { return flash_forward_v3_available(q); }

void launch_flash_bwd_v3(const FlashBwdArgs& a, bool causal, DType dt, dim3 grid, cudaStream_t stream) {
  const char* ws = std::getenv("OMNIQ_FLASH_BWD_V3_WS");
  if (!(ws != nullptr && ws[0] == '0') && flash_bwd_v3ws_fits()) {  // read per launch (a test flips it)
    launch_flash_bwd_v3ws(a, causal, dt, grid, stream);
    return;
  }
  flash_dispatch(dt, kB3D, causal, [&](auto e, auto, auto c) {
    using E = decltype(e);
    constexpr bool kC = decltype(c)::value;
    auto kernel = flash_bwd_v3_kernel<E, kC>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kB3Smem)));
    kernel<<<grid, kB3Threads, kB3Smem, stream>>>(
        static_cast<const E*>(a.q), static_cast<const E*>(a.k), static_cast<const E*>(a.v),
        static_cast<const E*>(a.dout), a.lse, a.delta, a.dq_acc, static_cast<E*>(a.dq), static_cast<E*>(a.dk),
        static_cast<E*>(a.dv), a.dk32, a.dv32, a.dq_ctr, a.kv_ctr, a.seq, a.Hq, a.Hkv, a.splits, a.scale,
        a.scale_log2, a.thread_fences);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace omniq::cuda
