// Flash attention backward, variant 2 (the default where the wgmma variant 3 does not run, e.g. D = 64
// or a GPU other than sm_90; OMNIQ_FLASH_BWD_V2=1 picks it anyway; variant 1 in
// flash_attention_backward.cu stays selectable with OMNIQ_FLASH_BWD_V1=1). Its launcher is also variant
// 3's launch frame. Same algorithm, same contract and the same ordered-mode
// design as variant 1 (read its header first); what changes and why:
//
// 1. CTA = 128 keys, 8 warps (FA2's shape for D = 128). Every Q/dO/lse/δ tile loaded from global
//    now serves twice the keys, and dQ gets half as many fp32 partial sums per element (T/128 key
//    tiles instead of T/64): half the dQ RED traffic to L2 and half the ordered hand-offs per query
//    tile (a 7B step at T = 2048: 16 instead of 32). Occupancy stays 8 warps per SM (one 173 KiB CTA
//    at D = 128 where v1 ran two 112 KiB CTAs of 4 warps). Each warp still owns 16 keys for
//    Sᵀ/dPᵀ/dK/dV, so that part of the code is variant 1's.
// 2. dQ = dS·K is split 2 (queries) x 4 (D) over the warps: 32x32 warp tiles (32x16 at D = 64)
//    read 4 ldmatrix per 16 keys where v1's 16-query x full-D tiles re-read the dS fragment for
//    every 16 columns (64 ldmatrix per warp per 64 keys). Half the shared-memory traffic of dQ.
// 3. The accumulators reach global memory as 16-byte vectors: a lane pair swaps half its C
//    fragment with one shuffle (lane 2i then holds row g, 4 consecutive columns; lane 2i+1 row g+8),
//    and adds with one red.global.add.v4.f32 (sm_90) instead of two .v2: 4x fewer RED
//    instructions per dQ element than v1 overall (with 1.).
// 4. Ordered mode knows which key tile adds first (kt = 0) and last (the diagonal one, or the
//    last key tile): the first stores its fp32 part (no memset of the 4·B·T·Hq·D-byte scratch),
//    the last loads the sum, adds its part and writes dQ·scale in q's dtype directly (no
//    scale_convert pass). Each element is still the same float sequence ((a0 + a1) + a2) + ...
//    in ascending kt every run, so it stays bitwise reproducible. Atomic mode keeps the zeroed
//    scratch + RED + convert.
// 5. Two barriers per query tile instead of three: dSᵀ is double-buffered (the next tile's dSᵀ
//    goes to the other buffer while slow warps may still read this one), the Q/dO buffer of a tile
//    is free once every warp passed the dSᵀ barrier (its last reads, dV/dK, come before it), and
//    the ordered hand-off of a tile happens right after the next tile's first barrier, not behind a
//    barrier of its own: thread 0 fences and increments (CUTLASS's GenericBarrier::arrive_inc; the
//    barrier orders every thread's adds before thread 0's gpu-scope fence). Until session 6 every
//    thread also fenced its own adds (OMNIQ_FLASH_BWD_THREAD_FENCES=1): 6% of the stall samples,
//    0.703 -> 0.680 ms at the 7B shape without them (and an extra barrier to hand on earlier: 0.700).
// 6. lse/δ rows come in by cp.async with the tiles (v1 loaded them synchronously, stalling 2 warps
//    on a global load round trip per tile); padding queries are masked explicitly.
// 7. Warps whose 16 keys are all masked for a query chunk (causal: keys after the chunk's last
//    query, on the diagonal tiles; or keys past the end) skip their Sᵀ/dPᵀ/dK/dV products and
//    write zeros as their dSᵀ rows.
// 8. A tile's 64 queries are processed in 2 chunks of 32 (template QC; OMNIQ_FLASH_BWD_QCHUNKS=1 for
//    one chunk): fewer registers live in the Sᵀ/dPᵀ phase, same bits.
// Deadlock freedom: as in v1, a CTA only waits for CTAs of smaller linear block id (dQ: same x, z,
// smaller key tile y; split dK/dV: same y, z, smaller split x), and delaying a hand-off to the next
// barrier adds no wait on any other CTA.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kKeys = 128;    // keys per CTA
constexpr int kThreads2 = 256;  // 8 warps x 16 keys

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// grid (Hkv·splits, ceil(T/128), B); arguments as in variant 1's flash_bwd_kernel, plus dq: the
// ordered mode's last contributor writes dQ there directly (dq_acc is then the running fp32 sum,
// written first by key tile 0, no zeroing needed); atomic mode adds into a zeroed dq_acc.
template <typename E, int D, bool kCausal, int QC>
__global__ void __launch_bounds__(kThreads2, 1)
    flash_bwd_v2_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        const E* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                        float* __restrict__ dq_acc, E* __restrict__ dq, E* __restrict__ dk, E* __restrict__ dv,
                        float* __restrict__ dk32, float* __restrict__ dv32, int* __restrict__ dq_ctr,
                        int* __restrict__ kv_ctr, int seq, int Hq, int Hkv, int splits, float scale,
                        float scale_log2, bool thread_fences) {
  constexpr int LD = D + 8, QTILE = kTile * LD, KTILE = kKeys * LD, KS = D / 16;
  constexpr int LDS = kTile + 8, DSTILE = kKeys * LDS;
  constexpr int kDW = D / 4, kNT = kDW / 8;  // dQ: D columns and 8-wide n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sK = reinterpret_cast<E*>(smem_raw);
  E* sV = sK + KTILE;
  E* sQ = sV + KTILE;          // [2][QTILE]
  E* sdO = sQ + 2 * QTILE;     // [2][QTILE]
  E* sdS = sdO + 2 * QTILE;    // [2][DSTILE]: dSᵀ [128 keys][LDS]
  float* sL = reinterpret_cast<float*>(sdS + 2 * DSTILE);  // [2][64] lse (natural log), 0 past the end
  float* sDelta = sL + 2 * kTile;                           // [2][64]
  const int G = Hq / Hkv, hpc = G / splits;
  const int kvh = blockIdx.x / splits, split = blockIdx.x % splits, kt = blockIdx.y, b = blockIdx.z;
  const int h_first = kvh * G + split * hpc;
  const int n0 = kt * kKeys;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const int nq = (seq + kTile - 1) / kTile, nk = (seq + kKeys - 1) / kKeys;
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
    const int m0 = mt * kTile;
    const int64_t off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
    load_rows_async<E, D, kTile, kThreads2>(sQ + buf * QTILE, q + off, ldq, seq - m0);
    load_rows_async<E, D, kTile, kThreads2>(sdO + buf * QTILE, dout + off, ldq, seq - m0);
    if (threadIdx.x < 2 * kTile) {  // threads 0..63: lse, 64..127: δ
      const int i = threadIdx.x & (kTile - 1);
      const bool ok = m0 + i < seq;
      const int64_t li = (static_cast<int64_t>(b) * Hq + h) * seq + m0 + (ok ? i : 0);
      cp_async4((threadIdx.x < kTile ? sL : sDelta) + buf * kTile + i, (threadIdx.x < kTile ? lse : delta) + li, ok);
    }
  };

  load_rows_async<E, D, kKeys, kThreads2>(sK, kg, ldk, seq - n0);
  load_rows_async<E, D, kKeys, kThreads2>(sV, vg, ldk, seq - n0);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[D / 8][4], dv_acc[D / 8][4];  // this warp's 16 keys x D
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;
  const int key_w = n0 + warp * 16;  // this warp's first key
  const int key0 = key_w + gr;       // this thread's key rows: key0 and key0 + 8
  const int qw = warp & 1, dw = warp >> 1;  // dQ warp tile: queries 32·qw.., columns kDW·dw..
  const float scale_lse = -kLog2e;
  int* pending = nullptr;  // ordered mode: the turn this CTA hands on after the next barrier

  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // (a) tile `it` visible; every thread's dQ adds of the previous tile precede
                      // thread 0's release of its turn just below
    if (pending != nullptr) {
      if (threadIdx.x == 0) cta_release_increment(pending, thread_fences);
      pending = nullptr;
    }
    const int buf = it & 1;
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kTile;
    const E* cQ = sQ + buf * QTILE;
    const E* cdO = sdO + buf * QTILE;
    const float* cL = sL + buf * kTile;
    const float* cD = sDelta + buf * kTile;
    E* cdS = sdS + buf * DSTILE;

    // The 64 queries of the tile in QC chunks of QW (QC = 2, the default: Sᵀ/dPᵀ of 16 keys x 32
    // queries live at a time, 32 instead of 64 registers; the products add in the same order either
    // way, so the bits do not depend on QC). H100, 7B shape: 0.664 ms (QC 2) vs 0.678 (QC 1) vs 0.687
    // (QC 4, not kept); the training step did not move (5.14 ms/step each).
    constexpr int QW = kTile / QC, NT = QW / 8, NP = QW / 16;
#pragma unroll
    for (int c = 0; c < QC; ++c) {
      const int q0 = c * QW;  // the chunk's first query in the tile
      // Warp-uniform: all 16 keys masked for all QW queries (P = dS = 0, nothing to add).
      const bool dead = key_w >= seq || (kCausal && key_w > m0 + q0 + QW - 1);
      if (!dead) {
        // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ: 16 keys x QW queries each.
        float st[NT][4], dpt[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t ak[4], av[4];
          ldsm_x4(ak, sK + a_off(lane, warp * 16, kk * 16, LD));
          ldsm_x4(av, sV + a_off(lane, warp * 16, kk * 16, LD));
#pragma unroll
          for (int np = 0; np < NP; ++np) {
            uint32_t bq[4], bo[4];
            ldsm_x4(bq, cQ + b_off(lane, q0 + np * 16, kk * 16, LD));
            ldsm_x4(bo, cdO + b_off(lane, q0 + np * 16, kk * 16, LD));
            mma16816<E>(st[2 * np], ak, bq[0], bq[1]);
            mma16816<E>(st[2 * np + 1], ak, bq[2], bq[3]);
            mma16816<E>(dpt[2 * np], av, bo[0], bo[1]);
            mma16816<E>(dpt[2 * np + 1], av, bo[2], bo[3]);
          }
        }
        // Pᵀ = exp(scale·Sᵀ − lse), dSᵀ = Pᵀ ⊙ (dPᵀ − δ); masked: keys past the end, queries past the
        // end (their zero-filled lse would give P = 1) and, causal, keys after the query.
        const bool edge = key_w + 16 > seq || m0 + q0 + QW > seq || (kCausal && key_w + 15 > m0 + q0);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = q0 + nt * 8 + 2 * tq + (e & 1);
            const int key = key0 + (e >> 1) * 8;
            float p = exp2f(fmaf(st[nt][e], scale_log2, cL[qi] * scale_lse));
            if (edge && (key >= seq || m0 + qi >= seq || (kCausal && key > m0 + qi))) p = 0.f;
            st[nt][e] = p;
            dpt[nt][e] = p * (dpt[nt][e] - cD[qi]);
          }
        // dV += Pᵀ·dO and dK += dSᵀ·Q (k = the chunk's queries; dO and Q rows are k, hence .trans).
#pragma unroll
        for (int kk = 0; kk < NP; ++kk) {
          const uint32_t ap[4] = {pack2<E>(st[2 * kk][0], st[2 * kk][1]), pack2<E>(st[2 * kk][2], st[2 * kk][3]),
                                  pack2<E>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                  pack2<E>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
          const uint32_t as[4] = {pack2<E>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<E>(dpt[2 * kk][2], dpt[2 * kk][3]),
                                  pack2<E>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                  pack2<E>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t bo[4], bq[4];
            ldsm_x4_trans(bo, cdO + a_off(lane, q0 + kk * 16, dp * 16, LD));
            ldsm_x4_trans(bq, cQ + a_off(lane, q0 + kk * 16, dp * 16, LD));
            mma16816<E>(dv_acc[2 * dp], ap, bo[0], bo[1]);
            mma16816<E>(dv_acc[2 * dp + 1], ap, bo[2], bo[3]);
            mma16816<E>(dk_acc[2 * dp], as, bq[0], bq[1]);
            mma16816<E>(dk_acc[2 * dp + 1], as, bq[2], bq[3]);
          }
        }
        // dSᵀ to shared: dQ needs all 128 keys of every query row, spread over the 8 warps.
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<uint32_t*>(cdS + (warp * 16 + gr + 8 * r) * LDS + q0 + nt * 8 + 2 * tq) =
                pack2<E>(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<uint32_t*>(cdS + (warp * 16 + gr + 8 * r) * LDS + q0 + nt * 8 + 2 * tq) = 0u;
      }
    }

    // Ordered mode: key tiles add to query tile (h, mt) in ascending kt; kt = 0 goes first and
    // stores, the last contributor (the tile holding the diagonal, or the last key tile) converts.
    int* turn = ordered ? dq_ctr + (static_cast<int64_t>(b) * Hq + h) * nq + mt : nullptr;
    const int last_kt = kCausal ? min(mt >> 1, nk - 1) : nk - 1;
    if (ordered && kt > 0) wait_turn(turn, kt);
    __syncthreads();  // (b) dSᵀ complete (and the turn, if waited for, acquired) for all warps

    // dQ (queries m0 + 32·qw .., columns kDW·dw ..) += dS·K over the 128 keys: A = dS read
    // transposed from dSᵀ, B = K rows (k = keys).
    float acc[2][kNT][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) ldsm_x4_trans(a[mi], cdS + b_off(lane, kk * 16, qw * 32 + mi * 16, LDS));
#pragma unroll
      for (int nb = 0; nb < kNT / 2; ++nb) {
        uint32_t bk[4];
        ldsm_x4_trans(bk, sK + a_off(lane, kk * 16, dw * kDW + nb * 16, LD));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma16816<E>(acc[mi][2 * nb], a[mi], bk[0], bk[1]);
          mma16816<E>(acc[mi][2 * nb + 1], a[mi], bk[2], bk[3]);
        }
      }
    }
    const bool last = kt == last_kt;
    const int mode = dq_mode(ordered, kt == 0, last);
    const bool odd = tq & 1;
    float* dqa = dq_acc + static_cast<int64_t>(b) * seq * ldq + static_cast<int64_t>(h) * D;
    E* dqo = dq + static_cast<int64_t>(b) * seq * ldq + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const float4 val = lane_pair_row4(acc[mi][nt], odd);
        const int row = m0 + qw * 32 + mi * 16 + gr + (odd ? 8 : 0);
        const int col = dw * kDW + nt * 8 + 2 * (tq & 2);
        if (row < seq) dq_write4<E>(mode, dqa, dqo, static_cast<int64_t>(row) * ldq + col, val, scale);
      }
    if (ordered && !last) {
      // Who makes this thread's adds visible before thread 0 hands the turn on: by default thread 0's
      // fence after the next barrier (see cta_release_increment); OMNIQ_FLASH_BWD_THREAD_FENCES=1 also
      // fences in every thread (the previous scheme: 6% of the stall samples were these fences).
      if (thread_fences) fence_acq_rel_gpu();
      pending = turn;  // handed on after the next barrier (a); an extra barrier to hand on here measured
                       // slower (7B: 0.700 vs 0.673 ms)
    }
  }
  if (pending != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) cta_release_increment(pending, thread_fences);
  }

  // Ordered split dK/dV: the splits of one (b, kv head, key tile) add in ascending split order.
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(b) * Hkv + kvh) * nk + kt : nullptr;
  kv_turn_begin(kv_turn, split);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= seq) continue;
    const int64_t off = (static_cast<int64_t>(b) * seq + key) * ldk + static_cast<int64_t>(kvh) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      dkdv_write2<E>(dk32, dv32, dk, dv, off + i * 8 + 2 * tq, dk_acc[i][2 * r] * scale, dk_acc[i][2 * r + 1] * scale,
                     dv_acc[i][2 * r], dv_acc[i][2 * r + 1]);
    }
  }
  kv_turn_end(kv_turn, split, splits, thread_fences);
}

// out[i] = scale · in[i] in E (the atomic mode's dQ scratch, and split dK/dV, to q's dtype).
template <typename E>
__global__ void scale_convert_v2_kernel(const float* __restrict__ in, E* __restrict__ out, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<E>(scale * in[i]);
}

std::atomic<int> g_query_chunks{0};  // 0: not decided yet (the environment is read at the first query)

// OMNIQ_FLASH_BWD_THREAD_FENCES=1 (read once): every thread fences its dQ / dK / dV adds before the
// hand-off, as up to session 6 (A/B switch; same bits either way).
bool flash_bwd_thread_fences() {
  static const bool on = [] {
    const char* e = std::getenv("OMNIQ_FLASH_BWD_THREAD_FENCES");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

constexpr size_t bwd_v2_smem_bytes(int D, size_t elem) {
  return (2ull * kKeys * (D + 8) + 4ull * kTile * (D + 8) + 2ull * kKeys * (kTile + 8)) * elem +
         4ull * kTile * sizeof(float);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

int flash_attention_kv_splits_v2(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int sms) {
  // One CTA per SM at D = 128 and causal tiles differing up to T/64-fold in work: ~3 CTAs per SM
  // even the waves out; each split adds a K/V tile load and the dK/dV fp32 adds.
  const int64_t G = Hq / Hkv, ctas = B * Hkv * ((T + kKeys - 1) / kKeys);
  for (int64_t s = 1; s < G; ++s)
    if (G % s == 0 && ctas * s >= 3 * static_cast<int64_t>(sms)) return static_cast<int>(s);
  return static_cast<int>(G);
}

void set_flash_backward_query_chunks(int chunks) {
  OMNIQ_CHECK(chunks == 1 || chunks == 2, "set_flash_backward_query_chunks: %d is not 1 or 2", chunks);
  g_query_chunks.store(chunks);
}

int flash_backward_query_chunks() {
  return setting_or_env(g_query_chunks, [] {
    const char* env = std::getenv("OMNIQ_FLASH_BWD_QCHUNKS");
    return env != nullptr && std::strcmp(env, "1") == 0 ? 1 : 2;
  });
}

namespace {

// The launch frame of variants 2 and 3 (same grid, scratch, counters and converts); v3 runs the wgmma
// kernel (flash_attention_backward_v3.cu) instead of this file's.
AttentionGrads backward_frame(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& delta, const Tensor& lse, float scale, bool causal, int kv_splits,
                              bool deterministic, bool v3) {
  OMNIQ_CHECK(aligned16(v) && aligned16(dout), "flash_attention_backward: v %s / dout %s not 16-byte aligned",
              v.str().c_str(), dout.str().c_str());
  const Device dev = q.device();
  CudaContext& ctx = cuda_context(dev);
  cudaStream_t stream = ctx.stream;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int splits =
      kv_splits > 0 ? kv_splits : flash_attention_kv_splits_v2(B, T, Hq, Hkv, ctx.prop.multiProcessorCount);
  OMNIQ_CHECK((Hq / Hkv) % splits == 0, "flash_attention_backward: %d splits do not divide the %lld query heads per kv head",
              splits, (long long)(Hq / Hkv));
  AttentionGrads g;
  g.dq = Tensor::empty(q.shape(), q.dtype(), dev);
  g.dk = Tensor::empty(k.shape(), q.dtype(), dev);
  g.dv = Tensor::empty(k.shape(), q.dtype(), dev);
  // fp32 dQ scratch, then the ordered mode's turn counters (per (b, query head, 64-query tile),
  // and per (b, kv head, 128-key tile) when split). Atomic mode zeroes all of it (the RED target);
  // ordered mode only the counters (key tile 0 stores its dQ part first).
  const int64_t nq = (T + kTile - 1) / kTile, nk = (T + kKeys - 1) / kKeys;
  const int64_t n_dq_ctr = deterministic ? B * Hq * nq : 0;
  const int64_t n_kv_ctr = deterministic && splits > 1 ? B * Hkv * nk : 0;
  Tensor dq_acc = Tensor::empty(Shape{q.numel() + n_dq_ctr + n_kv_ctr}, DType::f32, dev);
  float* dq_f32 = dq_acc.data_as<float>();
  int* dq_ctr = deterministic ? reinterpret_cast<int*>(dq_f32 + q.numel()) : nullptr;
  int* kv_ctr = n_kv_ctr > 0 ? dq_ctr + n_dq_ctr : nullptr;
  if (deterministic)
    CUDA_CHECK(cudaMemsetAsync(dq_ctr, 0, static_cast<size_t>(n_dq_ctr + n_kv_ctr) * sizeof(int), stream));
  else
    CUDA_CHECK(cudaMemsetAsync(dq_f32, 0, dq_acc.nbytes(), stream));
  Tensor dk32, dv32;
  if (splits > 1) {
    dk32 = Tensor::empty(k.shape(), DType::f32, dev);
    dv32 = Tensor::empty(k.shape(), DType::f32, dev);
    CUDA_CHECK(cudaMemsetAsync(dk32.data(), 0, static_cast<size_t>(dk32.numel()) * sizeof(float), stream));
    CUDA_CHECK(cudaMemsetAsync(dv32.data(), 0, static_cast<size_t>(dv32.numel()) * sizeof(float), stream));
  }
  const dim3 grid(static_cast<unsigned>(Hkv * splits), static_cast<unsigned>(nk), static_cast<unsigned>(B));
  flash_dispatch(q.dtype(), D, causal, [&](auto e, auto d, auto c) {
    using E = decltype(e);
    constexpr int kD = decltype(d)::value;
    constexpr bool kC = decltype(c)::value;
    const size_t smem = bwd_v2_smem_bytes(kD, sizeof(E));
    auto launch = [&](auto kernel) {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      kernel<<<grid, kThreads2, smem, stream>>>(
          q.data_as<E>(), k.data_as<E>(), v.data_as<E>(), dout.data_as<E>(), lse.data_as<float>(),
          delta.data_as<float>(), dq_f32, g.dq.data_as<E>(), g.dk.data_as<E>(), g.dv.data_as<E>(),
          splits > 1 ? dk32.data_as<float>() : nullptr, splits > 1 ? dv32.data_as<float>() : nullptr, dq_ctr, kv_ctr,
          static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), splits, scale, scale * kLog2e,
          flash_bwd_thread_fences());
      CUDA_CHECK_LAUNCH();
    };
    if (v3) {
      const FlashBwdArgs a{q.data(), k.data(), v.data(), dout.data(), lse.data_as<float>(), delta.data_as<float>(),
                           dq_f32, g.dq.data(), g.dk.data(), g.dv.data(),
                           splits > 1 ? dk32.data_as<float>() : nullptr, splits > 1 ? dv32.data_as<float>() : nullptr,
                           dq_ctr, kv_ctr, static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), splits,
                           scale, scale * kLog2e, flash_bwd_thread_fences()};
      launch_flash_bwd_v3(a, causal, q.dtype(), grid, stream);
    } else if (flash_backward_query_chunks() == 1) {
      launch(flash_bwd_v2_kernel<E, kD, kC, 1>);
    } else {
      launch(flash_bwd_v2_kernel<E, kD, kC, 2>);
    }
    if (!deterministic) {
      const int64_t n = q.numel();
      scale_convert_v2_kernel<E><<<grid_for(n, 256), 256, 0, stream>>>(dq_f32, g.dq.data_as<E>(), n, scale);
      CUDA_CHECK_LAUNCH();
    }
    if (splits > 1) {
      const int64_t nkv = k.numel();
      scale_convert_v2_kernel<E><<<grid_for(nkv, 256), 256, 0, stream>>>(dk32.data_as<float>(), g.dk.data_as<E>(),
                                                                        nkv, 1.f);
      CUDA_CHECK_LAUNCH();
      scale_convert_v2_kernel<E><<<grid_for(nkv, 256), 256, 0, stream>>>(dv32.data_as<float>(), g.dv.data_as<E>(),
                                                                        nkv, 1.f);
      CUDA_CHECK_LAUNCH();
    }
  });
  return g;
}

}  // namespace

AttentionGrads flash_attention_backward_v2(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic) {
  return backward_frame(dout, q, k, v, delta, lse, scale, causal, kv_splits, deterministic, false);
}

AttentionGrads flash_attention_backward_v3(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic) {
  OMNIQ_CHECK(flash_backward_v3_available(q),
              "flash_attention_backward_v3: needs D = 128 on an sm_90 GPU and a build for sm_90a (got D = %lld)",
              static_cast<long long>(q.size(3)));
  return backward_frame(dout, q, k, v, delta, lse, scale, causal, kv_splits, deterministic, true);
}

}  // namespace omniq::cuda
