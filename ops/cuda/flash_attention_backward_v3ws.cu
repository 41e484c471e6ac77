// Flash attention backward, variant 3, warp-specialised (the default form of variant 3; the plain
// form in flash_attention_backward_v3.cu stays for OMNIQ_FLASH_BWD_V3_WS=0). Same grid, tiles, products
// and summation orders as the plain form — identical dQ, dK, dV bits in the deterministic mode — but the
// dQ hand-off leaves the MMA warps:
//
//   warpgroups 0, 1 (MMA, 240 registers each after setmaxnreg): per 64-query tile exactly the plain
//     form's S/dP, softmax, dV/dK and dQ products; the tile's fp32 dQ part (64 × 128) goes to one of
//     two shared-memory buffers (mbarrier `full`), and the warps go straight on to the next tile.
//   warpgroup 2 (24 registers): takes each buffer in turn (waits `full`), waits for the ordered mode's
//     turn, and sends the part to global memory with the TMA engine — a bulk store (first contributor)
//     or a bulk fp32 reduce-add (cp.reduce.async.bulk, the adds done in L2), one 512-byte row per
//     operation — or, for the last contributor, loads the sum, adds, scales and writes dQ in 16 bits
//     with its 128 threads; then frees the buffer (`empty`) and hands the turn on.
//
// Why: in the plain form every MMA warp stalls per tile on the turn wait, on its dQ RED/stores and on
// the GPU-scope fence before the release (H100, 7B shape: deterministic 0.578 ms vs 0.50 atomic). Here
// the waits and the fence sit in warpgroup 2, up to two tiles behind the MMA warps: deterministic
// 0.401 ms, atomic 0.372 (bench_matmul; 70B GQA shape 1.16 → 0.82 ms deterministic).
// Registers: launch bounds of 384 threads give ptxas 168 per thread; setmaxnreg moves them to the MMA
// warpgroups (240, the plain form's code fits with ~100 bytes of spills) from warpgroup 2 (24). ptxas
// ignores that for a region holding a trap (spin_turn's deadlock guard): the MMA warps were then
// compiled for 168 registers with 680 bytes of spills and serialised wgmmas, which is why warpgroup 2
// also waits for the split dK/dV turn.
// The MMA warpgroups synchronise with each other through named barrier 1 (256 threads), warpgroup 2
// through barrier 2 (128 threads), the two roles only through mbarriers (a thread's arrive releases
// its shared-memory accesses to the waiters); __syncthreads only before the roles split.
#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#include "ops/cuda/flash_attention_backward_v3_tile.cuh"
#include "ops/cuda/flash_attention_common.cuh"
#include "ops/cuda/sm90_async.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kWQ = bwd3::kQ, kWD = bwd3::kD;
constexpr int kMmaThreads = 256, kWsThreads = 384;
constexpr int kMmaBar = 1, kDQBar = 2;             // named barriers of the MMA warps and of warpgroup 2
constexpr uint32_t kWKV = bwd3::kKVTile;           // 32 KiB (K, V)
constexpr uint32_t kWQTile = bwd3::kQTile;         // 16 KiB (Q, dO; double-buffered)
constexpr uint32_t kWDS = bwd3::kDSTile;           // 16 KiB (dSᵀ, one buffer: barrier (a) orders its reuse)
constexpr int kDQPitch = kWD + 8;                  // floats per dQ row in shared memory: +32 B makes the
                                                   // accumulator stores 2-way (the minimum for 256 B)
constexpr uint32_t kDQBuf = kWQ * kDQPitch * 4;    // 34 KiB, two of them
constexpr size_t kWsSmem = 2 * kWKV + 4 * kWQTile + kWDS + 2 * kDQBuf + 4 * kWQ * sizeof(float) + 64 + 1024;
static_assert(kWsSmem <= 232448, "exceeds the H100's shared memory per block");

template <typename E, bool kCausal>
__global__ void __launch_bounds__(kWsThreads, 1)
    flash_bwd_v3ws_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                          const E* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                          float* __restrict__ dq_acc, E* __restrict__ dq, E* __restrict__ dk, E* __restrict__ dv,
                          float* __restrict__ dk32, float* __restrict__ dv32, int* __restrict__ dq_ctr,
                          int* __restrict__ kv_ctr, int seq, int Hq, int Hkv, int splits, float scale,
                          float scale_log2) {
#ifdef OMNIQ_WGMMA
  constexpr int D = kWD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = wgmma::smem_addr(smem_raw);
  unsigned char* sK = smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u);
  unsigned char* sV = sK + kWKV;
  unsigned char* sQ = sV + kWKV;            // [2][kWQTile]
  unsigned char* sdO = sQ + 2 * kWQTile;    // [2][kWQTile]
  unsigned char* sdS = sdO + 2 * kWQTile;   // [kWDS]
  float* sDQ = reinterpret_cast<float*>(sdS + kWDS);  // [2][64][kDQPitch]
  float* sL = sDQ + 2 * kWQ * kDQPitch;     // [2][64] lse (natural log), 0 past the end
  float* sDelta = sL + 2 * kWQ;             // [2][64]
  uint64_t* full = reinterpret_cast<uint64_t*>(sDelta + 2 * kWQ);  // [2]: dQ part written (256 arrivals)
  uint64_t* empty = full + 2;                                       // [2]: dQ part sent (128 arrivals)
  uint64_t* kv_go = empty + 2;                                      // split dK/dV turn acquired (1 arrival)

  const bwd3::CtaWork w = bwd3::cta_work<kCausal>(seq, Hq, Hkv, splits, dq_ctr != nullptr);
  const int64_t ldq = static_cast<int64_t>(Hq) * D;

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      sm90::mbar_init(&full[s], kMmaThreads);
      sm90::mbar_init(&empty[s], 128);
    }
    sm90::mbar_init(kv_go, 1);
  }
  __syncthreads();  // the barriers exist before either role touches them

  // Split dK/dV (GQA with splits > 1, ordered mode): the splits of one (b, kv head, key tile) add in
  // ascending split order. Warpgroup 2 waits for the turn: a trap (the deadlock guard of spin_turn) in
  // the MMA warps' code keeps ptxas from giving them the registers of setmaxnreg (it then serialises
  // their wgmmas); the MMA warps only release.
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(w.b) * Hkv + w.kvh) * w.nk + w.kt : nullptr;
  const bool kv_wait = kv_turn != nullptr && w.split > 0;

  if (threadIdx.x >= kMmaThreads) {
    // ---------------- warpgroup 2: the dQ parts to global memory, in tile order ----------------
    sm90::regs_decrease<24>();
    const int t2 = threadIdx.x - kMmaThreads, lane = t2 & 31;
    for (int it = 0; it < w.iters; ++it) {
      const int s = it & 1;
      int h, mt;
      w.coords(it, h, mt);
      const int m0 = mt * kWQ, rows = min(kWQ, seq - m0);
      const bool last = w.kt == w.last_kt<kCausal>(mt);
      const int mode = dq_mode(w.ordered, w.kt == 0, last);
      int* turn = w.ordered ? dq_ctr + (static_cast<int64_t>(w.b) * Hq + h) * w.nq + mt : nullptr;
      sm90::mbar_wait(&full[s], (it >> 1) & 1);
      if (w.ordered && w.kt > 0) {
        if (t2 == 0) {
          spin_turn<false>(turn, w.kt);
          sm90::fence_proxy_async_global();  // the acquired sums, before this CTA's bulk adds
        }
        sm90::named_sync(kDQBar, 128);
      }
      const float* part = sDQ + s * kWQ * kDQPitch;
      const int64_t tile_off = (static_cast<int64_t>(w.b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
      float* dqa = dq_acc + tile_off;
      if (mode <= 1) {  // add (atomic mode, or a middle contributor) or store (the first of several): warp 8
        if (t2 < 32) {
          for (int r = lane; r < rows; r += 32) {
            if (mode == 0)
              sm90::bulk_add_f32(dqa + r * ldq, part + r * kDQPitch, D * 4);
            else
              sm90::bulk_store(dqa + r * ldq, part + r * kDQPitch, D * 4);
          }
          sm90::bulk_commit();
          sm90::bulk_wait_read();  // this lane's copies have read their rows: it frees them
          sm90::mbar_arrive(&empty[s]);
          if (w.ordered && !last) {  // release: the sums are in L2 before the successor acquires the turn
            sm90::bulk_wait_all();
            sm90::fence_proxy_async_global();
            __syncwarp();
            if (lane == 0) {
              fence_acq_rel_gpu();
              release_increment(turn);
            }
          }
        } else {
          sm90::mbar_arrive(&empty[s]);  // warps 9..11 read nothing
        }
      } else {  // 2: the only contributor, 3: the last: dQ = scale · (sum so far + part) in E
        E* dqo = dq + tile_off;
        for (int i = t2; i < rows * (D / 4); i += 128) {
          const int r = i / (D / 4), c = (i % (D / 4)) * 4;
          float4 s4 = *reinterpret_cast<const float4*>(part + r * kDQPitch + c);
          if (mode == 3) {  // L2 load (.cg): the sum was written by other SMs
            const float4 prev = __ldcg(reinterpret_cast<const float4*>(dqa + r * ldq + c));
            s4 = make_float4(prev.x + s4.x, prev.y + s4.y, prev.z + s4.z, prev.w + s4.w);
          }
          *reinterpret_cast<uint2*>(dqo + r * ldq + c) =
              make_uint2(pack2<E>(scale * s4.x, scale * s4.y), pack2<E>(scale * s4.z, scale * s4.w));
        }
        sm90::mbar_arrive(&empty[s]);  // after this thread's reads of the buffer (release)
      }
    }
    if (t2 < 32) sm90::bulk_wait_all();  // no bulk write outlives the CTA (the atomic mode's last adds)
    if (kv_wait && t2 == 0) {
      spin_turn<false>(kv_turn, w.split);
      sm90::mbar_arrive(kv_go);  // release (CTA scope) of what the acquire saw: the MMA warps add after it
    }
    return;
  }

  // ---------------- warpgroups 0, 1: the products (bwd3:: tile code, shared with the plain form) ----------------
  sm90::regs_increase<240>();
  const uint32_t aK = wgmma::smem_addr(sK), aV = wgmma::smem_addr(sV), aQ = wgmma::smem_addr(sQ),
                 adO = wgmma::smem_addr(sdO), adS = wgmma::smem_addr(sdS);
  const bwd3::KeyRows kr = bwd3::key_rows(w.n0);
  auto issue = [&](int it, int buf) {
    int h, mt;
    w.coords(it, h, mt);
    bwd3::load_query_tile<E, kMmaThreads>(sQ + buf * kWQTile, sdO + buf * kWQTile, sL + buf * kWQ, sDelta + buf * kWQ,
                                          q, dout, lse, delta, w.b, h, mt * kWQ, seq, Hq);
  };

  bwd3::load_key_tiles<E, kMmaThreads>(sK, sV, k, v, w, seq, Hkv);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[64], dv_acc[64];  // this warpgroup's 64 keys x D (wgmma accumulator layout)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;

  for (int it = 0; it < w.iters; ++it) {
    if (it + 1 < w.iters) issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    wgmma::fence_proxy_async();
    sm90::named_sync(kMmaBar, kMmaThreads);  // (a) tile `it` visible; both warpgroups' dQ products of
                                             // tile it − 1 (readers of dSᵀ) done
    const int buf = it & 1;
    int h, mt;
    w.coords(it, h, mt);
    bwd3::tile_products<E, kCausal>(dk_acc, dv_acc, aK, aV, aQ + buf * kWQTile, adO + buf * kWQTile, sL + buf * kWQ,
                                    sDelta + buf * kWQ, sdS, kr, mt * kWQ, seq, scale_log2);
    wgmma::fence_proxy_async();              // the dSᵀ stores → visible to the dQ wgmma after the barrier
    sm90::named_sync(kMmaBar, kMmaThreads);  // (b) dSᵀ complete for all warps

    float acc[32];
    bwd3::tile_dq<E>(acc, adS, aK, kr.wg);

    // The part to buffer it & 1 once warpgroup 2 has sent what it held two tiles ago.
    const int s = it & 1;
    if (it >= 2) sm90::mbar_wait(&empty[s], ((it >> 1) - 1) & 1);
    float* part = sDQ + s * kWQ * kDQPitch;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(part + (kr.warp * 16 + kr.gr + 8 * r) * kDQPitch + kr.wg * 64 + nt * 8 + 2 * kr.tq) =
            make_float2(acc[4 * nt + 2 * r], acc[4 * nt + 2 * r + 1]);
    wgmma::fence_proxy_async();  // the stores → visible to warpgroup 2's bulk copies
    sm90::mbar_arrive(&full[s]);
  }

  if (kv_wait) sm90::mbar_wait(kv_go, 0);  // warpgroup 2 holds the split turn
  bwd3::write_dkdv<E>(dk_acc, dv_acc, dk32, dv32, dk, dv, w, kr, seq, Hkv, scale);
  if (kv_turn != nullptr && w.split + 1 < splits) {
    sm90::named_sync(kMmaBar, kMmaThreads);
    if (threadIdx.x == 0) cta_release_increment(kv_turn, false);
  }
#else
  __trap();  // not built for sm_90a: flash_backward_v3_available() keeps the host from launching this
#endif
}

}  // namespace

bool flash_bwd_v3ws_fits() {
  int dev = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(optin) >= kWsSmem;
}

void launch_flash_bwd_v3ws(const FlashBwdArgs& a, bool causal, DType dt, dim3 grid, cudaStream_t stream) {
  flash_dispatch(dt, kWD, causal, [&](auto e, auto, auto c) {
    using E = decltype(e);
    constexpr bool kC = decltype(c)::value;
    auto kernel = flash_bwd_v3ws_kernel<E, kC>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kWsSmem)));
    kernel<<<grid, kWsThreads, kWsSmem, stream>>>(
        static_cast<const E*>(a.q), static_cast<const E*>(a.k), static_cast<const E*>(a.v),
        static_cast<const E*>(a.dout), a.lse, a.delta, a.dq_acc, static_cast<E*>(a.dq), static_cast<E*>(a.dk),
        static_cast<E*>(a.dv), a.dk32, a.dv32, a.dq_ctr, a.kv_ctr, a.seq, a.Hq, a.Hkv, a.splits, a.scale,
        a.scale_log2);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace omniq::cuda
