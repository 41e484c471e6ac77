// The per-tile device code of the wgmma flash backward (variant 3), shared by its plain form
// (flash_attention_backward_v3.cu, read its header for the algorithm) and its warp-specialised form
// (flash_attention_backward_v3ws.cu): the Q/dO/lse/δ loads of one 64-query tile, one warpgroup's
// products over its 64 keys (Sᵀ, dPᵀ, Pᵀ, dSᵀ, dV, dK, the dSᵀ rows to shared memory), and the dQ
// product. Everything is __forceinline__: a real call would make ptxas serialise the wgmmas.
#pragma once
#include <cstdint>

#include "ops/cuda/flash_attention_common.cuh"
#include "ops/cuda/wgmma.cuh"

namespace omniq::cuda::flash::bwd3 {

constexpr int kKeys = 128, kQ = 64, kD = 128;  // keys per CTA (2 warpgroups × 64), queries per tile, head dim
constexpr uint32_t kKVTile = kKeys * kD * 2;   // 32 KiB (K, V)
constexpr uint32_t kQTile = kQ * kD * 2;       // 16 KiB (Q, dO)
constexpr uint32_t kDSTile = kKeys * kQ * 2;   // 16 KiB (dSᵀ)

#ifdef OMNIQ_WGMMA
// What a CTA of the grid (Hkv·splits, ⌈T/128⌉, B) works on: key tile kt of kv head kvh in batch b,
// the hpc query heads of its split, and, per head, the query tiles from m_first on (causal: the first
// one that sees key n0). Iteration `it` handles (h, mt) = coords(it) (flash_attention_common.cuh's order).
struct CtaWork {
  int hpc, kvh, split, kt, b, h_first, n0, nq, nk, m_first, per_head, iters;
  bool ordered;
  __device__ __forceinline__ void coords(int it, int& h, int& mt) const {
    bwd_coords(ordered, it, hpc, per_head, h_first, nq, m_first, h, mt);
  }
  // The key tile that adds last to query tile mt (it holds the diagonal, or it is the last one).
  template <bool kCausal>
  __device__ __forceinline__ int last_kt(int mt) const {
    return kCausal ? min(mt >> 1, nk - 1) : nk - 1;
  }
};
template <bool kCausal>
__device__ __forceinline__ CtaWork cta_work(int seq, int Hq, int Hkv, int splits, bool ordered) {
  CtaWork w;
  const int G = Hq / Hkv;
  w.hpc = G / splits;
  w.kvh = blockIdx.x / splits;
  w.split = blockIdx.x % splits;
  w.kt = blockIdx.y;
  w.b = blockIdx.z;
  w.h_first = w.kvh * G + w.split * w.hpc;
  w.n0 = w.kt * kKeys;
  w.nq = (seq + kQ - 1) / kQ;
  w.nk = (seq + kKeys - 1) / kKeys;
  w.m_first = kCausal ? 2 * w.kt : 0;  // query tile 2kt holds the first query seeing key n0
  w.per_head = w.nq - w.m_first;
  w.iters = w.hpc * w.per_head;
  w.ordered = ordered;
  return w;
}

// An MMA thread's place (threadIdx.x < 256): warpgroup wg owns keys key_w .. key_w + 63 of the CTA's
// tile; the thread's accumulator rows are keys key0 and key0 + 8, rows srow0, srow0 + 8 of the dSᵀ tile.
struct KeyRows {
  int wg, warp, gr, tq, key_w, key0, srow0;
};
__device__ __forceinline__ KeyRows key_rows(int n0) {
  KeyRows r;
  r.wg = threadIdx.x >> 7;
  r.warp = (threadIdx.x >> 5) & 3;
  r.gr = (threadIdx.x & 31) >> 2;
  r.tq = threadIdx.x & 3;
  r.key_w = n0 + r.wg * 64;
  r.key0 = r.key_w + r.warp * 16 + r.gr;
  r.srow0 = r.wg * 64 + r.warp * 16 + r.gr;
  return r;
}

// cp.async of the CTA's K and V tiles (keys n0 .. n0 + 127 of kv head kvh; rows past `seq` zero).
template <typename E, int kThreads>
__device__ __forceinline__ void load_key_tiles(unsigned char* sk, unsigned char* sv, const E* k, const E* v,
                                               const CtaWork& w, int seq, int Hkv) {
  const int64_t ldk = static_cast<int64_t>(Hkv) * kD;
  const int64_t off = (static_cast<int64_t>(w.b) * seq + w.n0) * ldk + static_cast<int64_t>(w.kvh) * kD;
  load_swizzled<E, kKeys, kThreads>(sk, k + off, ldk, seq - w.n0);
  load_swizzled<E, kKeys, kThreads>(sv, v + off, ldk, seq - w.n0);
}

// cp.async of query tile (b, h, rows m0..m0+63) of Q and dO into swizzled tiles, and its lse and δ,
// by kThreads threads (0 .. kThreads − 1; threads 0..63 lse, 64..127 δ). Rows past `seq` are zero.
template <typename E, int kThreads>
__device__ __forceinline__ void load_query_tile(unsigned char* sq, unsigned char* sdo, float* sl, float* sdelta,
                                                const E* q, const E* dout, const float* lse, const float* delta,
                                                int b, int h, int m0, int seq, int Hq) {
  const int64_t ldq = static_cast<int64_t>(Hq) * kD;
  const int64_t off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * kD;
  load_swizzled<E, kQ, kThreads>(sq, q + off, ldq, seq - m0);
  load_swizzled<E, kQ, kThreads>(sdo, dout + off, ldq, seq - m0);
  if (threadIdx.x < 2 * kQ) {
    const int i = threadIdx.x & (kQ - 1);
    const bool ok = m0 + i < seq;
    const int64_t li = (static_cast<int64_t>(b) * Hq + h) * seq + m0 + (ok ? i : 0);
    cp_async4((threadIdx.x < kQ ? sl : sdelta) + i, (threadIdx.x < kQ ? lse : delta) + li, ok);
  }
}

// Warpgroup wg's products for one query tile (queries m0..m0+63, visible in shared memory at cQ / cdO,
// lse at cL, δ at cD): Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ (16 wgmma m64n64k16 from shared memory),
// Pᵀ = exp(scale·Sᵀ − lse) and dSᵀ = Pᵀ ⊙ (dPᵀ − δ) in registers (rows = keys, columns = queries), then
// dV_w += Pᵀ·dO and dK_w += dSᵀ·Q (8 wgmma m64n128k16, Pᵀ / dSᵀ from registers), and this thread's dSᵀ
// entries into dS_tile (16-bit, swizzled) while dV/dK run. A warpgroup whose 64 keys all lie after the
// tile's last query (causal) or past the end skips its products and writes zero dSᵀ.
template <typename E, bool kCausal>
__device__ __forceinline__ void tile_products(float (&dk_acc)[64], float (&dv_acc)[64], uint32_t aK, uint32_t aV,
                                              uint32_t cQ, uint32_t cdO, const float* cL, const float* cD,
                                              unsigned char* dS_tile, const KeyRows& kr, int m0, int seq,
                                              float scale_log2) {
  using Tag = typename wgmma::TagOf<E>::type;
  const int wg = kr.wg, key_w = kr.key_w, key0 = kr.key0, srow0 = kr.srow0, tq = kr.tq;
  const bool dead = key_w >= seq || (kCausal && key_w > m0 + kQ - 1);  // warpgroup-uniform
  if (dead) {
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<uint32_t*>(dS_tile + wgmma::swizzled_offset(kKeys, srow0 + 8 * (j & 1),
                                                                      16 * t + 8 * (j >> 1) + 2 * tq)) = 0u;
    return;
  }
  float st[32], dpt[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) st[i] = dpt[i] = 0.f;
  wgmma::fence_operand(st);
  wgmma::fence_operand(dpt);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    wgmma::mma_m64n64k16_ss<0, 0>(st, wgmma::desc_k_major(aK, kKeys, wg * 64, kk), wgmma::desc_k_major(cQ, kQ, 0, kk),
                                  kk > 0, Tag{});
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    wgmma::mma_m64n64k16_ss<0, 0>(dpt, wgmma::desc_k_major(aV, kKeys, wg * 64, kk),
                                  wgmma::desc_k_major(cdO, kQ, 0, kk), kk > 0, Tag{});
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(st);
  wgmma::fence_operand(dpt);

  // Masked: keys past the end, queries past the end (their zero-filled lse would give P = 1) and,
  // causal, keys after the query.
  const float scale_lse = -kLog2e;
  const bool edge = key_w + 64 > seq || m0 + kQ > seq || (kCausal && key_w + 63 > m0);
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
  for (int t = 0; t < 4; ++t) wgmma::mma_m64n128k16_rs<1>(dv_acc, ap[t], wgmma::desc_mn_major(cdO, kQ, t), 1, Tag{});
#pragma unroll
  for (int t = 0; t < 4; ++t) wgmma::mma_m64n128k16_rs<1>(dk_acc, as[t], wgmma::desc_mn_major(cQ, kQ, t), 1, Tag{});
  wgmma::commit();
  // dSᵀ to shared while dV/dK run: as[t][j] holds (row g + 8·(j&1), queries 16t + 8·(j>>1) + 2tq, +1).
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      *reinterpret_cast<uint32_t*>(dS_tile + wgmma::swizzled_offset(kKeys, srow0 + 8 * (j & 1),
                                                                    16 * t + 8 * (j >> 1) + 2 * tq)) = as[t][j];
  wgmma::wait<0>();
  wgmma::fence_operand(dv_acc);
  wgmma::fence_operand(dk_acc);
}

// dQ of the tile's 64 queries, columns 64·wg .. 64·wg + 63, over the CTA's 128 keys: dS·K with A = dS
// read MN-major from the dSᵀ tile at cdS and B = K's column half wg, MN-major (8 wgmma m64n64k16).
template <typename E>
__device__ __forceinline__ void tile_dq(float (&acc)[32], uint32_t cdS, uint32_t aK, int wg) {
  using Tag = typename wgmma::TagOf<E>::type;
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  wgmma::fence_operand(acc);
  wgmma::fence();
#pragma unroll
  for (int t = 0; t < kKeys / 16; ++t)
    wgmma::mma_m64n64k16_ss<1, 1>(acc, wgmma::desc_mn_major(cdS, kKeys, t),
                                  wgmma::desc_mn_major(aK + wg * kKeys * 128, kKeys, t), t > 0, Tag{});
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operand(acc);
}

// This thread's two key rows of dK (scaled) and dV: stores in E, or fp32 adds into the split scratch.
template <typename E>
__device__ __forceinline__ void write_dkdv(const float (&dk_acc)[64], const float (&dv_acc)[64], float* dk32,
                                           float* dv32, E* dk, E* dv, const CtaWork& w, const KeyRows& kr, int seq,
                                           int Hkv, float scale) {
  const int64_t ldk = static_cast<int64_t>(Hkv) * kD;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = kr.key0 + 8 * r;
    if (key >= seq) continue;
    const int64_t off = (static_cast<int64_t>(w.b) * seq + key) * ldk + static_cast<int64_t>(w.kvh) * kD;
#pragma unroll
    for (int i = 0; i < kD / 8; ++i)
      dkdv_write2<E>(dk32, dv32, dk, dv, off + i * 8 + 2 * kr.tq, dk_acc[4 * i + 2 * r] * scale,
                     dk_acc[4 * i + 2 * r + 1] * scale, dv_acc[4 * i + 2 * r], dv_acc[4 * i + 2 * r + 1]);
  }
}
#endif  // OMNIQ_WGMMA

}  // namespace omniq::cuda::flash::bwd3
