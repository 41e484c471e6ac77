// Flash attention backward (FA2 algorithm) for bf16/f16 and D ∈ {64, 128} on tensor cores, see
// ops/cuda/flash_attention.h (the forward and the shared primitives are next to this file).
// This is variant 1 (64-key CTAs of 4 warps), kept selectable with OMNIQ_FLASH_BWD_V1=1 for A/B
// runs; variant 2 (128-key CTAs of 8 warps, ops/cuda/flash_attention_backward_v2.cu) follows the same
// design with the changes listed in its header, and variant 3 (the default where it runs: wgmma,
// flash_attention_backward_v3.cu) keeps v2's CTA, grid and ordered mode. The variant switch and the
// public entry flash_attention_backward are at the end of this file.
//
// CTA (64 keys, kv head, batch, split) loops over G/splits query heads of its kv head and their
// 64-query tiles (from the diagonal down when causal), recomputing Pᵀ = exp(scale·K·Qᵀ − lse) and
// dPᵀ = V·dOᵀ from Q, dO, lse, δ; dSᵀ = Pᵀ ⊙ (dPᵀ − δ); dV += Pᵀ·dO and dK += dSᵀ·Q accumulate in
// fp32 registers (each warp owns 16 keys). With one split the CTA sees every query touching its
// keys and writes dK/dV once; GQA with few kv heads spreads the query heads over more CTAs (load
// balance) and adds the partial dK/dV with fp32 atomics. dQ += dS·K (dS through shared memory, as
// it spans all 4 warps' keys) always goes through fp32 atomics into a [B,T,Hq,D] scratch that a
// last kernel scales and converts. The next Q/dO tiles are prefetched with cp.async.
//
// Deterministic ("ordered") mode. fp32 atomics in scheduling order make dQ (and split dK/dV) differ
// in the last bits from run to run. Ordered mode keeps the same atomics but fixes their order, as
// FlashAttention-3's deterministic backward does: a zeroed int counter per (b, query head, query
// tile) holds how many key tiles have added their dQ part; the CTA of key tile kt waits (thread 0,
// ld.acquire) until it reads kt, adds, fences, and increments it. Key tiles thus add in ascending kt
// (for causal: kt = 0..m, all of them contribute to tile m; full: kt = 0..nq-1), and each element's
// sum is the same float sequence every run. Split dK/dV: a counter per (b, kv head, key tile) makes
// the splits add in ascending split order, at the end of the CTA.
//   Cheap because of the iteration order: in ordered mode every CTA walks its query tiles from the
// last one down (heads innermost), so the CTAs of key tiles kt and kt-1 reach tile (h, m) at the
// same iteration index and run in lockstep, each one dQ phase behind the previous (a constant
// lag of kt·(dQ phase + hand-off), not one that grows per iteration; walking upwards from the
// diagonal as the atomic mode does, CTA kt would wait one whole iteration per predecessor).
//   Why it cannot deadlock: a CTA only ever waits for CTAs with a smaller linear block id
// (x + y·gx + z·gx·gy): for dQ the same x (kv head, split) and z (batch) with a smaller key tile y;
// for dK/dV the same y, z with a smaller split in x. The GPU dispatches the blocks of a grid in
// increasing linear id (what CUTLASS's serial split-K semaphore and FA3 rely on too), so when a CTA
// is resident all smaller ids are resident or finished. Take the smallest unfinished id: everything
// it waits for has finished, each contributor before it incremented the counter exactly once and no
// later one can have (it waits for this one), so the counter equals its turn and it runs to the end;
// by induction every CTA finishes, whatever the residency (one CTA per SM would do). A wait beyond
// 20 s traps (an error instead of a hang) should that dispatch assumption ever break.
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

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// (load_acquire, wait_turn and pass_turn live in flash_attention_common.cuh, shared with v2.)

// grid (Hkv·splits, ceil(T/64), B); key tile kt = blockIdx.y: the longest causal tiles (kt = 0)
// start first. CTA x handles kv head x / splits and its query heads [split·hpc, (split+1)·hpc) with
// hpc = G / splits. dk32/dv32 null: store dK/dV in E; else atomically add fp32 partials there.
// dq_ctr non-null: ordered mode, turn counters [B][Hq][nq] for dQ, and kv_ctr [B][Hkv][nq] for the
// split dK/dV (non-null iff ordered and splits > 1); all zero at launch.
template <typename E, int D, bool kCausal>
__global__ void __launch_bounds__(kThreads)
    flash_bwd_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                     const E* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                     float* __restrict__ dq_acc, E* __restrict__ dk, E* __restrict__ dv, float* __restrict__ dk32,
                     float* __restrict__ dv32, int* __restrict__ dq_ctr, int* __restrict__ kv_ctr, int seq, int Hq,
                     int Hkv, int splits, float scale, float scale_log2) {
  constexpr int LD = D + 8, TILE = kTile * LD, KS = D / 16, LDS = kTile + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sK = reinterpret_cast<E*>(smem_raw);
  E* sV = sK + TILE;
  E* sQ = sV + TILE;       // [2][TILE]
  E* sdO = sQ + 2 * TILE;  // [2][TILE]
  E* sdS = sdO + 2 * TILE;  // dSᵀ [64 keys][LDS]
  float* sL = reinterpret_cast<float*>(sdS + kTile * LDS);  // [2][64] lse·log2(e), +inf past the end
  float* sDelta = sL + 2 * kTile;                            // [2][64]
  const int G = Hq / Hkv, hpc = G / splits;
  const int kvh = blockIdx.x / splits, split = blockIdx.x % splits, kt = blockIdx.y, b = blockIdx.z;
  const int h_first = kvh * G + split * hpc;
  const int n0 = kt * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const int nq = (seq + kTile - 1) / kTile;
  const int m_first = kCausal ? kt : 0;  // (tiles are square) earlier queries see none of these keys
  const int per_head = nq - m_first;
  const int iters = hpc * per_head;
  const E* kg = k + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + (static_cast<int64_t>(b) * seq + n0) * ldk + static_cast<int64_t>(kvh) * D;

  const bool ordered = dq_ctr != nullptr;
  // Iteration `it` handles query head h and query tile mt. Atomic mode: heads outer, tiles upwards
  // from the first one seeing these keys. Ordered mode: tiles downwards from the last, heads inner,
  // so (h, mt) comes at the same `it` in every key tile's CTA (the lockstep of the header comment).
  auto coords = [&](int it, int& h, int& mt) { bwd_coords(ordered, it, hpc, per_head, h_first, nq, m_first, h, mt); };
  auto issue = [&](int it, int buf) {
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kTile;
    const int64_t off = (static_cast<int64_t>(b) * seq + m0) * ldq + static_cast<int64_t>(h) * D;
    load_tile_async<E, D>(sQ + buf * TILE, q + off, ldq, seq - m0);
    load_tile_async<E, D>(sdO + buf * TILE, dout + off, ldq, seq - m0);
    if (threadIdx.x < kTile) {
      const int row = m0 + threadIdx.x;
      const int64_t li = (static_cast<int64_t>(b) * Hq + h) * seq + row;
      sL[buf * kTile + threadIdx.x] = row < seq ? lse[li] * kLog2e : INFINITY;  // P = 0 for padding rows
      sDelta[buf * kTile + threadIdx.x] = row < seq ? delta[li] : 0.f;
    }
  };

  load_tile_async<E, D>(sK, kg, ldk, seq - n0);
  load_tile_async<E, D>(sV, vg, ldk, seq - n0);
  issue(0, 0);
  cp_async_commit();

  float dk_acc[D / 8][4], dv_acc[D / 8][4];  // this warp's 16 keys x D
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;
  const int key0 = n0 + warp * 16 + gr;  // this thread's key rows: key0 and key0 + 8

  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int buf = it & 1;
    int h, mt;
    coords(it, h, mt);
    const int m0 = mt * kTile;
    const E* cQ = sQ + buf * TILE;
    const E* cdO = sdO + buf * TILE;
    const float* cL = sL + buf * kTile;
    const float* cD = sDelta + buf * kTile;

    // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ: 16 keys x 64 queries each.
    float st[8][4], dpt[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + a_off(lane, warp * 16, kk * 16, LD));
      ldsm_x4(av, sV + a_off(lane, warp * 16, kk * 16, LD));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, cQ + b_off(lane, np * 16, kk * 16, LD));
        ldsm_x4(bo, cdO + b_off(lane, np * 16, kk * 16, LD));
        mma16816<E>(st[2 * np], ak, bq[0], bq[1]);
        mma16816<E>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma16816<E>(dpt[2 * np], av, bo[0], bo[1]);
        mma16816<E>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }
    // Pᵀ = exp(scale·Sᵀ − lse) (masked to 0), dSᵀ = Pᵀ ⊙ (dPᵀ − δ); lse/δ belong to the query column.
    // Masking is needed on the diagonal tile and the one holding the last keys (padding queries
    // need none: their lse is +inf, so P = 0).
    const bool edge = n0 + kTile > seq || (kCausal && n0 + kTile - 1 > m0);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * tq + (e & 1);
        const int key = key0 + (e >> 1) * 8;
        float p = exp2f(st[nt][e] * scale_log2 - cL[qi]);
        if (edge && (key >= seq || (kCausal && key > m0 + qi))) p = 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - cD[qi]);
      }
    // dV += Pᵀ·dO and dK += dSᵀ·Q (k = the 64 queries; dO and Q rows are k, hence .trans).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t ap[4] = {pack2<E>(st[2 * kk][0], st[2 * kk][1]), pack2<E>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<E>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<E>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t as[4] = {pack2<E>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<E>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<E>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<E>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bo[4], bq[4];
        ldsm_x4_trans(bo, cdO + a_off(lane, kk * 16, dp * 16, LD));
        ldsm_x4_trans(bq, cQ + a_off(lane, kk * 16, dp * 16, LD));
        mma16816<E>(dv_acc[2 * dp], ap, bo[0], bo[1]);
        mma16816<E>(dv_acc[2 * dp + 1], ap, bo[2], bo[3]);
        mma16816<E>(dk_acc[2 * dp], as, bq[0], bq[1]);
        mma16816<E>(dk_acc[2 * dp + 1], as, bq[2], bq[3]);
      }
    }
    // dSᵀ to shared: dQ needs all 64 keys of every query row, spread over the 4 warps.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + gr + 8 * r) * LDS + nt * 8 + 2 * tq) =
            pack2<E>(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
    // Ordered mode: key tiles add to query tile (h, mt) in ascending kt; kt = 0 goes first.
    int* turn = ordered ? dq_ctr + (static_cast<int64_t>(b) * Hq + h) * nq + mt : nullptr;
    if (ordered && kt > 0) wait_turn(turn, kt);
    __syncthreads();  // sdS complete (and the turn, if waited for, acquired) for all warps

    // dQ (queries m0 + 16·warp ..) += dS·K: A = dS read transposed from dSᵀ, B = K rows (k = keys).
    const int qrow0 = m0 + warp * 16 + gr;
    float* dqg = dq_acc + static_cast<int64_t>(b) * seq * ldq + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4], bk[4];
        ldsm_x4_trans(a, sdS + b_off(lane, kk * 16, warp * 16, LDS));
        ldsm_x4_trans(bk, sK + a_off(lane, kk * 16, dp * 16, LD));
        mma16816<E>(acc[0], a, bk[0], bk[1]);
        mma16816<E>(acc[1], a, bk[2], bk[3]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = qrow0 + 8 * r;
          if (row < seq)
            atomic_add2(dqg + row * ldq + dp * 16 + half * 8 + 2 * tq, acc[half][2 * r], acc[half][2 * r + 1]);
        }
    }
    // Hand the tile on unless this is its last contributor (the diagonal tile, or the last key tile).
    if (ordered && kt < (kCausal ? mt : nq - 1))
      pass_turn(turn);  // its __syncthreads also frees sdS and buffer `buf` for the next iteration
    else
      __syncthreads();  // sdS and buffer `buf` are free before the next iteration overwrites them
  }

  // Ordered split dK/dV: the splits of one (b, kv head, key tile) add in ascending split order.
  int* kv_turn = kv_ctr != nullptr ? kv_ctr + (static_cast<int64_t>(b) * Hkv + kvh) * nq + kt : nullptr;
  if (kv_turn != nullptr && split > 0) {
    wait_turn(kv_turn, split);
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= seq) continue;
    const int64_t off = (static_cast<int64_t>(b) * seq + key) * ldk + static_cast<int64_t>(kvh) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + 2 * tq;
      dkdv_write2<E>(dk32, dv32, dk, dv, off + col, dk_acc[i][2 * r] * scale, dk_acc[i][2 * r + 1] * scale,
                     dv_acc[i][2 * r], dv_acc[i][2 * r + 1]);
    }
  }
  if (kv_turn != nullptr && split + 1 < splits) pass_turn(kv_turn);
}

// out[i] = scale · in[i] in E (the dQ scratch to q's dtype).
template <typename E>
__global__ void scale_convert_kernel(const float* __restrict__ in, E* __restrict__ out, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<E>(scale * in[i]);
}

constexpr size_t bwd_smem_bytes(int D, size_t elem) {
  return 6ull * kTile * (D + 8) * elem + 1ull * kTile * (kTile + 8) * elem + 4ull * kTile * sizeof(float);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

int flash_attention_kv_splits(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int sms) {
  // Enough CTAs for ~4 per SM (2 fit at a time; causal tiles differ up to T/64-fold in work), using
  // the fewest splits: each split adds a K/V tile load and fp32 atomics of dK/dV per CTA.
  const int64_t G = Hq / Hkv, ctas = B * Hkv * ((T + kTile - 1) / kTile);
  for (int64_t s = 1; s < G; ++s)
    if (G % s == 0 && ctas * s >= 4 * static_cast<int64_t>(sms)) return static_cast<int>(s);
  return static_cast<int>(G);
}

AttentionGrads flash_attention_backward_v1(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                           int kv_splits, bool deterministic) {
  OMNIQ_CHECK(aligned16(v) && aligned16(dout), "flash_attention_backward: v %s / dout %s not 16-byte aligned",
              v.str().c_str(), dout.str().c_str());
  const Device dev = q.device();
  CudaContext& ctx = cuda_context(dev);
  cudaStream_t stream = ctx.stream;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int splits = kv_splits > 0 ? kv_splits : flash_attention_kv_splits(B, T, Hq, Hkv, ctx.prop.multiProcessorCount);
  OMNIQ_CHECK((Hq / Hkv) % splits == 0, "flash_attention_backward: %d splits do not divide the %lld query heads per kv head",
              splits, (long long)(Hq / Hkv));
  AttentionGrads g;
  g.dq = Tensor::empty(q.shape(), q.dtype(), dev);
  g.dk = Tensor::empty(k.shape(), q.dtype(), dev);
  g.dv = Tensor::empty(k.shape(), q.dtype(), dev);
  // dQ gathers contributions from every key tile: fp32 atomics into a zeroed scratch. The ordered
  // mode's turn counters (per (b, query head, query tile), and per (b, kv head, key tile) when
  // split) live right behind it, so one stream-ordered memset zeroes them too (int 0 = bits of 0.f);
  // fresh per call, so concurrent or back-to-back backwards never share counters.
  const int64_t nq = (T + kTile - 1) / kTile;
  const int64_t n_dq_ctr = deterministic ? B * Hq * nq : 0;
  const int64_t n_kv_ctr = deterministic && splits > 1 ? B * Hkv * nq : 0;
  Tensor dq_acc = Tensor::empty(Shape{q.numel() + n_dq_ctr + n_kv_ctr}, DType::f32, dev);
  CUDA_CHECK(cudaMemsetAsync(dq_acc.data(), 0, dq_acc.nbytes(), stream));
  int* dq_ctr = deterministic ? reinterpret_cast<int*>(dq_acc.data_as<float>() + q.numel()) : nullptr;
  int* kv_ctr = n_kv_ctr > 0 ? dq_ctr + n_dq_ctr : nullptr;
  // Split query heads: dK/dV partials meet in zeroed fp32 buffers, converted at the end.
  Tensor dk32, dv32;
  if (splits > 1) {
    dk32 = Tensor::empty(k.shape(), DType::f32, dev);
    dv32 = Tensor::empty(k.shape(), DType::f32, dev);
    CUDA_CHECK(cudaMemsetAsync(dk32.data(), 0, static_cast<size_t>(dk32.numel()) * sizeof(float), stream));
    CUDA_CHECK(cudaMemsetAsync(dv32.data(), 0, static_cast<size_t>(dv32.numel()) * sizeof(float), stream));
  }
  const dim3 grid(static_cast<unsigned>(Hkv * splits), static_cast<unsigned>((T + kTile - 1) / kTile),
                  static_cast<unsigned>(B));
  flash_dispatch(q.dtype(), D, causal, [&](auto e, auto d, auto c) {
    using E = decltype(e);
    constexpr int kD = decltype(d)::value;
    constexpr bool kC = decltype(c)::value;
    const size_t smem = bwd_smem_bytes(kD, sizeof(E));
    CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_kernel<E, kD, kC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    flash_bwd_kernel<E, kD, kC><<<grid, kThreads, smem, stream>>>(
        q.data_as<E>(), k.data_as<E>(), v.data_as<E>(), dout.data_as<E>(), lse.data_as<float>(),
        delta.data_as<float>(), dq_acc.data_as<float>(), g.dk.data_as<E>(), g.dv.data_as<E>(),
        splits > 1 ? dk32.data_as<float>() : nullptr, splits > 1 ? dv32.data_as<float>() : nullptr, dq_ctr, kv_ctr,
        static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), splits, scale, scale * kLog2e);
    CUDA_CHECK_LAUNCH();
    const int64_t n = q.numel();
    scale_convert_kernel<E><<<grid_for(n, 256), 256, 0, stream>>>(dq_acc.data_as<float>(), g.dq.data_as<E>(), n,
                                                                 scale);
    CUDA_CHECK_LAUNCH();
    if (splits > 1) {
      const int64_t nk = k.numel();
      scale_convert_kernel<E><<<grid_for(nk, 256), 256, 0, stream>>>(dk32.data_as<float>(), g.dk.data_as<E>(), nk, 1.f);
      CUDA_CHECK_LAUNCH();
      scale_convert_kernel<E><<<grid_for(nk, 256), 256, 0, stream>>>(dv32.data_as<float>(), g.dv.data_as<E>(), nk, 1.f);
      CUDA_CHECK_LAUNCH();
    }
  });
  return g;
}

// ---------------------------------------------------------------------------------------------
// variant switch (v1: the kernel above; v2: ops/cuda/flash_attention_backward_v2.cu; v3: the wgmma
// kernel of flash_attention_backward_v3.cu, run by v2's launcher where available)

namespace {
std::atomic<int> g_bwd_variant{0};  // 0: not decided yet (the environment is read at the first query)
}  // namespace

void set_flash_backward_variant(int variant) {
  OMNIQ_CHECK(variant >= 1 && variant <= 3, "set_flash_backward_variant: variant %d is not 1, 2 or 3", variant);
  g_bwd_variant.store(variant);
}

int flash_backward_variant() {
  return setting_or_env(g_bwd_variant, [] {
    auto set = [](const char* name) {
      const char* env = std::getenv(name);
      return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
    };
    return set("OMNIQ_FLASH_BWD_V1") ? 1 : set("OMNIQ_FLASH_BWD_V2") ? 2 : 3;
  });
}

AttentionGrads flash_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& delta, const Tensor& lse, float scale, bool causal,
                                        int kv_splits, bool deterministic) {
  const int variant = flash_backward_variant();
  if (variant == 1)
    return flash_attention_backward_v1(dout, q, k, v, delta, lse, scale, causal, kv_splits, deterministic);
  if (variant == 3 && flash_backward_v3_available(q))
    return flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, causal, kv_splits, deterministic);
  return flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, kv_splits, deterministic);
}

}  // namespace omniq::cuda
