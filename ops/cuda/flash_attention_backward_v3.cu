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
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kB3Keys = 128, kB3Q = 64, kB3D = 128, kB3Threads = 256;
constexpr uint32_t kKVTile = kB3Keys * kB3D * 2;   // 32 KiB (K, V)
constexpr uint32_t kQTile = kB3Q * kB3D * 2;       // 16 KiB (Q, dO; double-buffered)
constexpr uint32_t kDSTile = kB3Keys * kB3Q * 2;   // 16 KiB (dSᵀ; double-buffered)
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
  using Tag = typename wgmma::TagOf<E>::type;
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

  const int G = Hq / Hkv, hpc = G / splits;
  const int kvh = blockIdx.x / splits, split = blockIdx.x % splits, kt = blockIdx.y, b = blockIdx.z;
  const int h_first = kvh * G + split * hpc;
  const int n0 = kt * kB3Keys;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const int nq = (seq + kB3Q - 1) / kB3Q, nk = (seq + kB3Keys - 1) / kB3Keys;
  const int m_first = kCausal ? 2 * kt : 0;  // query tile 2kt holds the first query seeing key n0
  const int per_head = nq - m_first;
  const int iters = hpc * per_head;
  const E* kg = k + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;

  const bool ordered = dq_ctr != nullptr;
  auto coords = [&](int it, int& h, int& mt) { bwd_coords(ordered, it, hpc, per_head, h_first, nq, m_first, h, mt); };
  auto issue = [&](int it, int buf) {
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kB3Q;
    const int64_t off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
    load_swizzled<E, kB3Q, kB3Threads>(sQ + buf * kQTile, q + off, ldq, seq - m0);
    load_swizzled<E, kB3Q, kB3Threads>(sdO + buf * kQTile, dout + off, ldq, seq - m0);
    if (threadIdx.x < 2 * kB3Q) {  // threads 0..63: lse, 64..127: δ
      const int i = threadIdx.x & (kB3Q - 1);
      const bool ok = m0 + i < seq;
      const int64_t li = (static_cast<int64_t>(b) * Hq + h) * seq + m0 + (ok ? i : 0);
      cp_async4((threadIdx.x < kB3Q ? sL : sDelta) + buf * kB3Q + i, (threadIdx.x < kB3Q ? lse : delta) + li, ok);
    }
  };

  load_swizzled<E, kB3Keys, kB3Threads>(sK, kg, ldk, seq - n0);
  load_swizzled<E, kB3Keys, kB3Threads>(sV, vg, ldk, seq - n0);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[64], dv_acc[64];  // this warpgroup's 64 keys x D (wgmma accumulator layout)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  const int key_w = n0 + wg * 64;               // this warpgroup's first key
  const int key0 = key_w + warp * 16 + gr;      // this thread's key rows: key0 and key0 + 8
  const int srow0 = wg * 64 + warp * 16 + gr;   // the same rows in the CTA's key tile (dSᵀ rows)
  const float scale_lse = -kLog2e;
  int* pending = nullptr;  // ordered mode: the turn this CTA hands on after the next barrier

  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) issue(it + 1, (it + 1) & 1);
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
    coords(it, h, mt);
    const int m0 = mt * kB3Q;
    const uint32_t cQ = aQ + buf * kQTile, cdO = adO + buf * kQTile, cdS = adS + buf * kDSTile;
    const float* cL = sL + buf * kB3Q;
    const float* cD = sDelta + buf * kB3Q;
    unsigned char* dS_tile = sdS + buf * kDSTile;

    // Warpgroup-uniform: all 64 keys masked for all 64 queries (P = dS = 0, nothing to add).
    const bool dead = key_w >= seq || (kCausal && key_w > m0 + kB3Q - 1);
    if (!dead) {
      float st[32], dpt[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) st[i] = dpt[i] = 0.f;
      wgmma::fence_operand(st);
      wgmma::fence_operand(dpt);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_m64n64k16_ss<0, 0>(st, wgmma::desc_k_major(aK, kB3Keys, wg * 64, kk),
                                      wgmma::desc_k_major(cQ, kB3Q, 0, kk), kk > 0, Tag{});
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_m64n64k16_ss<0, 0>(dpt, wgmma::desc_k_major(aV, kB3Keys, wg * 64, kk),
                                      wgmma::desc_k_major(cdO, kB3Q, 0, kk), kk > 0, Tag{});
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operand(st);
      wgmma::fence_operand(dpt);

      // Pᵀ, dSᵀ; masked: keys past the end, queries past the end (their zero-filled lse would give
      // P = 1) and, causal, keys after the query.
      const bool edge = key_w + 64 > seq || m0 + kB3Q > seq || (kCausal && key_w + 63 > m0);
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
        wgmma::mma_m64n128k16_rs<1>(dv_acc, ap[t], wgmma::desc_mn_major(cdO, kB3Q, t), 1, Tag{});
#pragma unroll
      for (int t = 0; t < 4; ++t)
        wgmma::mma_m64n128k16_rs<1>(dk_acc, as[t], wgmma::desc_mn_major(cQ, kB3Q, t), 1, Tag{});
      wgmma::commit();
      // dSᵀ to shared while dV/dK run: as[t][j] holds (row g + 8·(j&1), queries 16t + 8·(j>>1) + 2tq, +1).
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<uint32_t*>(dS_tile + wgmma::swizzled_offset(kB3Keys, srow0 + 8 * (j & 1),
                                                                        16 * t + 8 * (j >> 1) + 2 * tq)) = as[t][j];
      wgmma::wait<0>();
      wgmma::fence_operand(dv_acc);
      wgmma::fence_operand(dk_acc);
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<uint32_t*>(dS_tile + wgmma::swizzled_offset(kB3Keys, srow0 + 8 * (j & 1),
                                                                        16 * t + 8 * (j >> 1) + 2 * tq)) = 0u;
    }
    wgmma::fence_proxy_async();  // the dSᵀ stores → visible to the dQ wgmma after the barrier

    // Ordered mode: key tiles add to query tile (h, mt) in ascending kt; kt = 0 goes first and
    // stores, the last contributor (the tile holding the diagonal, or the last key tile) converts.
    int* turn = ordered ? dq_ctr + (static_cast<int64_t>(b) * Hq + h) * nq + mt : nullptr;
    const int last_kt = kCausal ? min(mt >> 1, nk - 1) : nk - 1;
    if (ordered && kt > 0) wait_turn<false>(turn, kt);
    __syncthreads();  // (b) dSᵀ complete (and the turn, if waited for, acquired) for all warps

    // dQ (the tile's 64 queries, columns 64·wg ..) = dS·K over the 128 keys: A = dS, MN-major from
    // the dSᵀ tile (one 64-query column half); B = K's column half wg, MN-major.
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    wgmma::fence_operand(acc);
    wgmma::fence();
#pragma unroll
    for (int t = 0; t < kB3Keys / 16; ++t)
      wgmma::mma_m64n64k16_ss<1, 1>(acc, wgmma::desc_mn_major(cdS, kB3Keys, t),
                                    wgmma::desc_mn_major(aK + wg * kB3Keys * 128, kB3Keys, t), t > 0, Tag{});
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(acc);

    const bool last = kt == last_kt;
    const int mode = dq_mode(ordered, kt == 0, last);
    const bool odd = tq & 1;
    float* dqa = dq_acc + static_cast<int64_t>(b) * seq * ldq + static_cast<int64_t>(h) * D;
    E* dqo = dq + static_cast<int64_t>(b) * seq * ldq + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float4 val = lane_pair_row4(acc + 4 * nt, odd);
      const int row = m0 + warp * 16 + gr + (odd ? 8 : 0);
      const int col = wg * 64 + nt * 8 + 2 * (tq & 2);
      if (row < seq) dq_write4<E>(mode, dqa, dqo, static_cast<int64_t>(row) * ldq + col, val, scale);
    }
    if (ordered && !last) {
      if (thread_fences) fence_acq_rel_gpu();
      pending = turn;  // handed on after the next barrier (a), as in v2
    }
  }
  if (pending != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) cta_release_increment(pending, thread_fences);
  }

  // Ordered split dK/dV: the splits of one (b, kv head, key tile) add in ascending split order.
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(b) * Hkv + kvh) * nk + kt : nullptr;
  kv_turn_begin<false>(kv_turn, split);
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
  kv_turn_end(kv_turn, split, splits, thread_fences);
#else
  __trap();  // not built for sm_90a: flash_backward_v3_available() keeps the host from launching this
#endif
}


}  // namespace

bool flash_backward_v3_available(const Tensor& q) { return flash_forward_v3_available(q); }

void launch_flash_bwd_v3(const FlashBwdArgs& a, bool causal, DType dt, dim3 grid, cudaStream_t stream) {
  const char* ws = std::getenv("OMNIQ_FLASH_BWD_V3_WS");
  if (!(ws != nullptr && ws[0] == '0')) {  // read per launch (a test flips it between launches)
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
