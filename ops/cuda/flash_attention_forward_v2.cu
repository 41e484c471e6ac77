// Flash attention forward, variant 2 (selectable with OMNIQ_FLASH_FWD_V2=1; variant 1 in
// flash_attention.cu measured faster on the H100, as this one spills, and variant 3 (wgmma) is the
// default where it runs). Same algorithm and numerics as variant 1 (online softmax
// in the log2 domain, P rounded to 16 bits before P·V, fp32 accumulation); the difference is the
// work per warp:
//
// CTA = 128 queries, 4 warps of 32 query rows (two m16 tiles) instead of 64 queries, 4 warps of 16.
// Every K and V fragment read from shared memory (ldmatrix) now feeds two MMAs instead of one:
// per 64-key tile and warp 80 ldmatrix.x4 for 256 MMAs, where v1 needs 64 for 128 (1 : 3.2 instead
// of 1 : 2). v1 is bound by shared-memory bandwidth (128 B/clk/SM: 4 clk per ldmatrix.x4, about
// the time of 2 mma.sync), v2 by the tensor pipe. K/V tiles also stream from L2 once per 128
// queries, half of v1's traffic. Q is re-read from shared memory per key tile (two A fragments per
// 16 columns) instead of being held in registers: the 32-row O accumulator (128 fp32 registers at
// D = 128) and S (64) leave no room for it. Two CTAs per SM (104 KiB smem each at D = 128).
// Causal: the CTA's last two key tiles straddle the diagonal; a warp skips a key tile lying
// entirely after its 32 queries (nothing visible: its softmax state is unchanged).
#include <climits>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kRows = 128;  // queries per CTA, 32 per warp

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// grid (Hq, ceil(T/128), B); the query tile index runs backwards so the longest causal tiles start first.
template <typename E, int D, bool kCausal>
__global__ void __launch_bounds__(kThreads, 2)
    flash_fwd_v2_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        E* __restrict__ out, float* __restrict__ lse, int seq, int Hq, int Hkv, float scale_log2) {
  constexpr int LD = D + 8, QTILE = kRows * LD, TILE = kTile * LD, KS = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sQ = reinterpret_cast<E*>(smem_raw);
  E* sK = sQ + QTILE;     // [2][TILE]
  E* sV = sK + 2 * TILE;  // [2][TILE]
  const int h = blockIdx.x, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (Hq / Hkv), q0 = qt * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const E* qg = q + (static_cast<int64_t>(b) * seq + q0) * ldq + static_cast<int64_t>(h) * D;
  const E* kg = k + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const int n_end = kCausal ? min(seq, q0 + kRows) : seq;  // keys beyond the tile's last query are masked anyway
  const int n_tiles = (n_end + kTile - 1) / kTile;
  const int wq0 = q0 + warp * 32;  // this warp's first query

  load_rows_async<E, D, kRows, kThreads>(sQ, qg, ldq, seq - q0);
  load_rows_async<E, D, kTile, kThreads>(sK, kg, ldk, seq);
  load_rows_async<E, D, kTile, kThreads>(sV, vg, ldk, seq);
  cp_async_commit();

  float o[2][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
  // Per m-tile mi and half r (rows wq0 + 16·mi + gr + 8·r): log2-domain max, thread-partial sum.
  float m_run[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l_run[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      const int64_t off = static_cast<int64_t>(j + 1) * kTile * ldk;
      load_rows_async<E, D, kTile, kThreads>(sK + ((j + 1) & 1) * TILE, kg + off, ldk, seq - (j + 1) * kTile);
      load_rows_async<E, D, kTile, kThreads>(sV + ((j + 1) & 1) * TILE, vg + off, ldk, seq - (j + 1) * kTile);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group done" == tile j ready
    cp_async_wait<1>();
    __syncthreads();
    const E* cK = sK + (j & 1) * TILE;
    const E* cV = sV + (j & 1) * TILE;
    const int kv0 = j * kTile;

    // Causal: a key tile after all 32 of this warp's queries changes nothing for it.
    if (!(kCausal && kv0 > wq0 + 31)) {
      float s[2][8][4];  // S for 2 x 16 queries x 64 keys
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int i = 0; i < 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) ldsm_x4(a[mi], sQ + a_off(lane, warp * 32 + mi * 16, kk * 16, LD));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t bk[4];
          ldsm_x4(bk, cK + b_off(lane, np * 16, kk * 16, LD));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816<E>(s[mi][2 * np], a[mi], bk[0], bk[1]);
            mma16816<E>(s[mi][2 * np + 1], a[mi], bk[2], bk[3]);
          }
        }
      }

      // Online softmax in the log2 domain (as v1): x = scale·log2(e)·s, masked entries -inf. Only
      // the tiles straddling this warp's diagonal and the one holding the sequence end need masks.
      const bool edge = kv0 + kTile > seq || (kCausal && kv0 + kTile - 1 > wq0);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int row0 = wq0 + mi * 16 + gr;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = kv0 + nt * 8 + 2 * tq + (e & 1);
            const int row = row0 + (e >> 1) * 8;
            float x = s[mi][nt][e] * scale_log2;
            if (edge && (col >= seq || (kCausal && col > row))) x = -INFINITY;
            s[mi][nt][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
          }
        float base[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // a row's 64 values live in the 4 lanes of one quad
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          const float m_new = fmaxf(m_run[mi][r], mx[r]);
          base[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: exps stay 0 instead of NaN
          alpha[r] = exp2f(m_run[mi][r] - base[r]);
          m_run[mi][r] = m_new;
          l_run[mi][r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float p = exp2f(s[mi][nt][e] - base[e >> 1]);
            s[mi][nt][e] = p;
            l_run[mi][e >> 1] += p;
          }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[mi][i][0] *= alpha[0], o[mi][i][1] *= alpha[0];
          o[mi][i][2] *= alpha[1], o[mi][i][3] *= alpha[1];
        }
      }

      // O += P·V: P's C fragments (keys 16kk..16kk+15) are the A fragments; V via ldmatrix.trans,
      // each V fragment serving both m-tiles.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          a[mi][0] = pack2<E>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          a[mi][1] = pack2<E>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          a[mi][2] = pack2<E>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          a[mi][3] = pack2<E>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bv[4];
          ldsm_x4_trans(bv, cV + a_off(lane, kk * 16, dp * 16, LD));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816<E>(o[mi][2 * dp], a[mi], bv[0], bv[1]);
            mma16816<E>(o[mi][2 * dp + 1], a[mi], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // everyone is done with buffer j&1 before iteration j+1 refills it
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = wq0 + mi * 16 + gr + r * 8;
      if (row < seq) {
        E* orow = out + (static_cast<int64_t>(b) * seq + row) * ldq + static_cast<int64_t>(h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
          *reinterpret_cast<uint32_t*>(orow + i * 8 + 2 * tq) =
              pack2<E>(o[mi][i][2 * r] * inv, o[mi][i][2 * r + 1] * inv);
        if (tq == 0) lse[(static_cast<int64_t>(b) * Hq + h) * seq + row] = (m_run[mi][r] + log2f(l)) * kLn2;
      }
    }
}

constexpr size_t fwd_v2_smem_bytes(int D, size_t elem) { return (kRows + 4ull * kTile) * (D + 8) * elem; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

Tensor flash_attention_forward_v2(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out) {
  OMNIQ_CHECK(aligned16(v), "flash_attention_forward: v %s is not 16-byte aligned", v.str().c_str());
  const Device dev = q.device();
  cudaStream_t stream = cuda_context(dev).stream;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  Tensor out = Tensor::empty(q.shape(), q.dtype(), dev);
  Tensor lse = Tensor::empty(Shape{B, Hq, T}, DType::f32, dev);
  const dim3 grid(static_cast<unsigned>(Hq), static_cast<unsigned>((T + kRows - 1) / kRows),
                  static_cast<unsigned>(B));
  flash_dispatch(q.dtype(), D, causal, [&](auto e, auto d, auto c) {
    using E = decltype(e);
    constexpr int kD = decltype(d)::value;
    constexpr bool kC = decltype(c)::value;
    const size_t smem = fwd_v2_smem_bytes(kD, sizeof(E));
    CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_v2_kernel<E, kD, kC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    flash_fwd_v2_kernel<E, kD, kC><<<grid, kThreads, smem, stream>>>(
        q.data_as<E>(), k.data_as<E>(), v.data_as<E>(), out.data_as<E>(), lse.data_as<float>(),
        static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), scale * kLog2e);
    CUDA_CHECK_LAUNCH();
  });
  if (lse_out) *lse_out = std::move(lse);
  return out;
}

}  // namespace omniq::cuda
