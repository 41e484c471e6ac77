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
// through barrier 2 (128 threads); __syncthreads only before the roles split.
#include <cstdlib>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#include "ops/cuda/flash_attention_common.cuh"
#include "ops/cuda/sm90_async.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kWKeys = 128, kWQ = 64, kWD = 128;
constexpr int kMmaThreads = 256, kWsThreads = 384;
constexpr int kMmaBar = 1, kDQBar = 2;  // named barriers of the MMA warps and of warpgroup 2
constexpr uint32_t kWKV = kWKeys * kWD * 2;        // 32 KiB (K, V)
constexpr uint32_t kWQTile = kWQ * kWD * 2;        // 16 KiB (Q, dO; double-buffered)
constexpr uint32_t kWDS = kWKeys * kWQ * 2;        // 16 KiB (dSᵀ, one buffer: barrier (a) orders its reuse)
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
  using Tag = typename wgmma::TagOf<E>::type;
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

  const int G = Hq / Hkv, hpc = G / splits;
  const int kvh = blockIdx.x / splits, split = blockIdx.x % splits, kt = blockIdx.y, b = blockIdx.z;
  const int h_first = kvh * G + split * hpc;
  const int n0 = kt * kWKeys;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const int nq = (seq + kWQ - 1) / kWQ, nk = (seq + kWKeys - 1) / kWKeys;
  const int m_first = kCausal ? 2 * kt : 0;  // query tile 2kt holds the first query seeing key n0
  const int per_head = nq - m_first;
  const int iters = hpc * per_head;
  const bool ordered = dq_ctr != nullptr;
  auto coords = [&](int it, int& h, int& mt) { bwd_coords(ordered, it, hpc, per_head, h_first, nq, m_first, h, mt); };

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
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(b) * Hkv + kvh) * nk + kt : nullptr;
  const bool kv_wait = kv_turn != nullptr && split > 0;

  if (threadIdx.x >= kMmaThreads) {
    // ---------------- warpgroup 2: the dQ parts to global memory, in tile order ----------------
    sm90::regs_decrease<24>();
    const int t2 = threadIdx.x - kMmaThreads, lane = t2 & 31;
    for (int it = 0; it < iters; ++it) {
      const int s = it & 1;
      int h, mt;
      coords(it, h, mt);
      const int m0 = mt * kWQ, rows = min(kWQ, seq - m0);
      const bool last = kt == (kCausal ? min(mt >> 1, nk - 1) : nk - 1);
      const int mode = dq_mode(ordered, kt == 0, last);
      int* turn = ordered ? dq_ctr + (static_cast<int64_t>(b) * Hq + h) * nq + mt : nullptr;
      sm90::mbar_wait(&full[s], (it >> 1) & 1);
      if (ordered && kt > 0) {
        if (t2 == 0) {
          spin_turn<false>(turn, kt);
          sm90::fence_proxy_async_global();  // the acquired sums, before this CTA's bulk adds
        }
        sm90::named_sync(kDQBar, 128);
      }
      const float* part = sDQ + s * kWQ * kDQPitch;
      const int64_t tile_off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
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
          if (ordered && !last) {  // release: the sums are in L2 before the successor acquires the turn
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
    if (kv_wait && t2 == 0) {
      spin_turn<false>(kv_turn, split);
      sm90::mbar_arrive(kv_go);  // release (CTA scope) of what the acquire saw: the MMA warps add after it
    }
    return;
  }

  // ---------------- warpgroups 0, 1: the products (the plain form's code, flash_attention_backward_v3.cu) ----------------
  sm90::regs_increase<240>();
  const uint32_t aK = wgmma::smem_addr(sK), aV = wgmma::smem_addr(sV), aQ = wgmma::smem_addr(sQ),
                 adO = wgmma::smem_addr(sdO), adS = wgmma::smem_addr(sdS);
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int gr = lane >> 2, tq = lane & 3;
  const E* kg = k + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;
  auto issue = [&](int it, int buf) {
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kWQ;
    const int64_t off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
    load_swizzled<E, kWQ, kMmaThreads>(sQ + buf * kWQTile, q + off, ldq, seq - m0);
    load_swizzled<E, kWQ, kMmaThreads>(sdO + buf * kWQTile, dout + off, ldq, seq - m0);
    if (threadIdx.x < 2 * kWQ) {  // threads 0..63: lse, 64..127: δ
      const int i = threadIdx.x & (kWQ - 1);
      const bool ok = m0 + i < seq;
      const int64_t li = (static_cast<int64_t>(b) * Hq + h) * seq + m0 + (ok ? i : 0);
      cp_async4((threadIdx.x < kWQ ? sL : sDelta) + buf * kWQ + i, (threadIdx.x < kWQ ? lse : delta) + li, ok);
    }
  };

  load_swizzled<E, kWKeys, kMmaThreads>(sK, kg, ldk, seq - n0);
  load_swizzled<E, kWKeys, kMmaThreads>(sV, vg, ldk, seq - n0);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[64], dv_acc[64];  // this warpgroup's 64 keys x D (wgmma accumulator layout)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  const int key_w = n0 + wg * 64;               // this warpgroup's first key
  const int key0 = key_w + warp * 16 + gr;      // this thread's key rows: key0 and key0 + 8
  const int srow0 = wg * 64 + warp * 16 + gr;   // the same rows in the CTA's key tile (dSᵀ rows)
  const float scale_lse = -kLog2e;

  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    wgmma::fence_proxy_async();
    sm90::named_sync(kMmaBar, kMmaThreads);  // (a) tile `it` visible; both warpgroups' dQ products of
                                             // tile it − 1 (readers of dSᵀ) done
    const int buf = it & 1;
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kWQ;
    const uint32_t cQ = aQ + buf * kWQTile, cdO = adO + buf * kWQTile;
    const float* cL = sL + buf * kWQ;
    const float* cD = sDelta + buf * kWQ;

    // Warpgroup-uniform: all 64 keys masked for all 64 queries (P = dS = 0, nothing to add).
    const bool dead = key_w >= seq || (kCausal && key_w > m0 + kWQ - 1);
    if (!dead) {
      float st[32], dpt[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) st[i] = dpt[i] = 0.f;
      wgmma::fence_operand(st);
      wgmma::fence_operand(dpt);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_m64n64k16_ss<0, 0>(st, wgmma::desc_k_major(aK, kWKeys, wg * 64, kk),
                                      wgmma::desc_k_major(cQ, kWQ, 0, kk), kk > 0, Tag{});
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_m64n64k16_ss<0, 0>(dpt, wgmma::desc_k_major(aV, kWKeys, wg * 64, kk),
                                      wgmma::desc_k_major(cdO, kWQ, 0, kk), kk > 0, Tag{});
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operand(st);
      wgmma::fence_operand(dpt);

      // Pᵀ, dSᵀ; masked: keys past the end, queries past the end (their zero-filled lse would give
      // P = 1) and, causal, keys after the query.
      const bool edge = key_w + 64 > seq || m0 + kWQ > seq || (kCausal && key_w + 63 > m0);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * tq + (e & 1);
          const int key = key0 + (e >> 1) * 8;
          float p = exp2f(fmaf(st[4 * nt + e], scale_log2, cL[qi] * scale_lse));
          if (edge && (key >= seq || m0 + qi >= seq || (kCausal && key > m0 + qi))) p = 0.f;
          st[4 * nt + e] = p;
          dpt[4 * nt + e] = p * (dpt[4 * nt + e] - cD[qi]);
        }
      // k16 slice t of the queries = accumulator n-tiles 2t, 2t+1: the A operands of dV and dK.
      uint32_t ap[4][4], as[4][4];
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          ap[t][j] = pack2<E>(st[8 * t + 2 * j], st[8 * t + 2 * j + 1]);
          as[t][j] = pack2<E>(dpt[8 * t + 2 * j], dpt[8 * t + 2 * j + 1]);
        }
      wgmma::fence_operand(dv_acc);
      wgmma::fence_operand(dk_acc);
      wgmma::fence();
#pragma unroll
      for (int t = 0; t < 4; ++t)
        wgmma::mma_m64n128k16_rs<1>(dv_acc, ap[t], wgmma::desc_mn_major(cdO, kWQ, t), 1, Tag{});
#pragma unroll
      for (int t = 0; t < 4; ++t)
        wgmma::mma_m64n128k16_rs<1>(dk_acc, as[t], wgmma::desc_mn_major(cQ, kWQ, t), 1, Tag{});
      wgmma::commit();
      // dSᵀ to shared while dV/dK run: as[t][j] holds (row g + 8·(j&1), queries 16t + 8·(j>>1) + 2tq, +1).
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<uint32_t*>(sdS + wgmma::swizzled_offset(kWKeys, srow0 + 8 * (j & 1),
                                                                    16 * t + 8 * (j >> 1) + 2 * tq)) = as[t][j];
      wgmma::wait<0>();
      wgmma::fence_operand(dv_acc);
      wgmma::fence_operand(dk_acc);
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<uint32_t*>(sdS + wgmma::swizzled_offset(kWKeys, srow0 + 8 * (j & 1),
                                                                    16 * t + 8 * (j >> 1) + 2 * tq)) = 0u;
    }
    wgmma::fence_proxy_async();              // the dSᵀ stores → visible to the dQ wgmma after the barrier
    sm90::named_sync(kMmaBar, kMmaThreads);  // (b) dSᵀ complete for all warps

    // dQ (the tile's 64 queries, columns 64·wg ..) = dS·K over the 128 keys: A = dS, MN-major from
    // the dSᵀ tile (one 64-query column half); B = K's column half wg, MN-major.
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    wgmma::fence_operand(acc);
    wgmma::fence();
#pragma unroll
    for (int t = 0; t < kWKeys / 16; ++t)
      wgmma::mma_m64n64k16_ss<1, 1>(acc, wgmma::desc_mn_major(adS, kWKeys, t),
                                    wgmma::desc_mn_major(aK + wg * kWKeys * 128, kWKeys, t), t > 0, Tag{});
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(acc);

    // The part to buffer it & 1 once warpgroup 2 has sent what it held two tiles ago.
    const int s = it & 1;
    if (it >= 2) sm90::mbar_wait(&empty[s], ((it >> 1) - 1) & 1);
    float* part = sDQ + s * kWQ * kDQPitch;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(part + (warp * 16 + gr + 8 * r) * kDQPitch + wg * 64 + nt * 8 + 2 * tq) =
            make_float2(acc[4 * nt + 2 * r], acc[4 * nt + 2 * r + 1]);
    wgmma::fence_proxy_async();  // the stores → visible to warpgroup 2's bulk copies
    sm90::mbar_arrive(&full[s]);
  }

  if (kv_wait) sm90::mbar_wait(kv_go, 0);  // warpgroup 2 holds the split turn
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= seq) continue;
    const int64_t off = (static_cast<int64_t>(b) * seq + key) * ldk + static_cast<int64_t>(kvh) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      dkdv_write2<E>(dk32, dv32, dk, dv, off + i * 8 + 2 * tq, dk_acc[4 * i + 2 * r] * scale,
                     dk_acc[4 * i + 2 * r + 1] * scale, dv_acc[4 * i + 2 * r], dv_acc[4 * i + 2 * r + 1]);
    }
  }
  if (kv_turn != nullptr && split + 1 < splits) {
    sm90::named_sync(kMmaBar, kMmaThreads);
    if (threadIdx.x == 0) cta_release_increment(kv_turn, false);
  }
#else
  __trap();  // not built for sm_90a: flash_backward_v3_available() keeps the host from launching this
#endif
}

}  // namespace

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
