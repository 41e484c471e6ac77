// Flash attention forward (FA2 algorithm) for bf16/f16 and D ∈ {64, 128} on tensor cores
// (mma.sync m16n8k16, fp32 accumulation), see ops/cuda/flash_attention.h; the backward lives in
// ops/cuda/flash_attention_backward.cu, the shared primitives in ops/cuda/flash_attention_common.cuh.
// This is variant 1 (64-query CTAs, 16 rows per warp): the default wherever the wgmma variant 3
// (ops/cuda/flash_attention_forward_v3.cu: D = 128, sm_90, sm_90a build; 0.137 ms at the 7B shape on
// the H100) does not run, and for D = 64. Variant 2 (128-query CTAs, 32 rows per warp,
// ops/cuda/flash_attention_forward_v2.cu) is selectable with OMNIQ_FLASH_FWD_V2=1; it reuses each K/V
// fragment twice but spills at 255 registers: on the H100 (7B MHA, T = 2048) v1 takes 0.153 ms and v2
// 0.172 ms.
// The variant switch and the public entry flash_attention_forward are at the end of this file.
//
// Tiles are 64 rows; a CTA has 4 warps and each warp owns 16 rows of the tile it iterates against.
// CTA (64 queries, head, batch) loops over 64-key tiles (only those at or left of the diagonal when
// causal); S = Q·Kᵀ stays in registers, online softmax in fp32 (log2 domain), O accumulates in fp32
// registers and is written once in q's dtype together with lse. The next K/V tiles are prefetched
// with cp.async into a second buffer while the current one is used.
//
// Napkin math (B=1, T=2048, H=32, D=128, causal): forward 4·H·T²·D/2 = 34 GFLOP (0.3 ms at 115
// TFLOP/s), backward 2.5x that; memory traffic is ~T·H·D·2 bytes per operand pass (16 MiB), small.
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// grid (Hq, ceil(T/64), B); the query tile index runs backwards so the longest causal tiles start first.
template <typename E, int D, bool kCausal>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const E* __restrict__ q, const E* __restrict__ k,
                                                             const E* __restrict__ v, E* __restrict__ out,
                                                             float* __restrict__ lse, int seq, int Hq, int Hkv,
                                                             float scale_log2) {
  constexpr int LD = D + 8, TILE = kTile * LD, KS = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sQ = reinterpret_cast<E*>(smem_raw);
  E* sK = sQ + TILE;      // [2][TILE]
  E* sV = sK + 2 * TILE;  // [2][TILE]
  const int h = blockIdx.x, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (Hq / Hkv), q0 = qt * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const E* qg = q + (static_cast<int64_t>(b) * seq + q0) * ldq + static_cast<int64_t>(h) * D;
  const E* kg = k + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const int n_end = kCausal ? min(seq, q0 + kTile) : seq;  // keys beyond the tile's last query are masked anyway
  const int n_tiles = (n_end + kTile - 1) / kTile;

  load_tile_async<E, D>(sQ, qg, ldq, seq - q0);
  load_tile_async<E, D>(sK, kg, ldk, seq);
  load_tile_async<E, D>(sV, vg, ldk, seq);
  cp_async_commit();

  uint32_t qf[KS][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // log2-domain max; thread-partial sum
  const int row0 = q0 + warp * 16 + gr;  // this thread's query rows: row0 and row0 + 8

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      const int64_t off = static_cast<int64_t>(j + 1) * kTile * ldk;
      load_tile_async<E, D>(sK + ((j + 1) & 1) * TILE, kg + off, ldk, seq - (j + 1) * kTile);
      load_tile_async<E, D>(sV + ((j + 1) & 1) * TILE, vg + off, ldk, seq - (j + 1) * kTile);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group done" == tile j ready
    cp_async_wait<1>();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) ldsm_x4(qf[kk], sQ + a_off(lane, warp * 16, kk * 16, LD));
    }
    const E* cK = sK + (j & 1) * TILE;
    const E* cV = sV + (j & 1) * TILE;

    float s[8][4];  // S for 16 queries x 64 keys
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4];
        ldsm_x4(bk, cK + b_off(lane, np * 16, kk * 16, LD));
        mma16816<E>(s[2 * np], qf[kk], bk[0], bk[1]);
        mma16816<E>(s[2 * np + 1], qf[kk], bk[2], bk[3]);
      }

    // Online softmax (flash_attention_common.cuh). Only the diagonal tile (causal; tiles are square
    // and aligned) and the tile holding the sequence end need the per-element mask.
    const int kv0 = j * kTile;
    const bool edge = kv0 + kTile > seq || (kCausal && kv0 + kTile - 1 > q0);
    float alpha[2];
    online_softmax_tile<8, kCausal>(&s[0][0], kv0, row0, tq, seq, edge, scale_log2, m_run, l_run, alpha);
    rescale_rows<D / 8>(&o[0][0], alpha);

    // O += P·V: P's C fragments (keys 16kk..16kk+15) are the A fragment; V via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t a[4] = {pack2<E>(s[2 * kk][0], s[2 * kk][1]), pack2<E>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<E>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, cV + a_off(lane, kk * 16, dp * 16, LD));
        mma16816<E>(o[2 * dp], a, bv[0], bv[1]);
        mma16816<E>(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // everyone is done with buffer j&1 before iteration j+1 refills it
  }

  write_out_lse<E, D / 8>(
      &o[0][0], l_run, m_run, row0, tq, seq,
      [&](int row) { return out + (static_cast<int64_t>(b) * seq + row) * ldq + static_cast<int64_t>(h) * D; },
      lse + (static_cast<int64_t>(b) * Hq + h) * seq);
}

constexpr size_t fwd_smem_bytes(int D, size_t elem) { return 5ull * kTile * (D + 8) * elem; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

bool flash_attention_supported(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* dout) {
  if (q.dtype() != DType::bf16 && q.dtype() != DType::f16) return false;
  if (q.size(3) != 64 && q.size(3) != 128) return false;
  const int64_t tiles = (q.size(1) + kTile - 1) / kTile;
  // Grid limits (y: 65535 tiles, z: 65535 batch) and int sequence indices.
  if (tiles > 65535 || q.size(0) > 65535 || q.size(1) > INT_MAX / 2 || q.size(2) > INT_MAX) return false;
  return aligned16(q) && aligned16(k) && aligned16(v) && (dout == nullptr || aligned16(*dout));
}

Tensor flash_attention_forward_v1(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out) {
  OMNIQ_CHECK(aligned16(v), "flash_attention_forward: v %s is not 16-byte aligned", v.str().c_str());
  const Device dev = q.device();
  cudaStream_t stream = cuda_context(dev).stream;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Hkv = k.size(2), D = q.size(3);
  Tensor out = Tensor::empty(q.shape(), q.dtype(), dev);
  Tensor lse = Tensor::empty(Shape{B, Hq, T}, DType::f32, dev);
  const dim3 grid(static_cast<unsigned>(Hq), static_cast<unsigned>((T + kTile - 1) / kTile),
                  static_cast<unsigned>(B));
  flash_dispatch(q.dtype(), D, causal, [&](auto e, auto d, auto c) {
    using E = decltype(e);
    constexpr int kD = decltype(d)::value;
    constexpr bool kC = decltype(c)::value;
    const size_t smem = fwd_smem_bytes(kD, sizeof(E));
    CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_kernel<E, kD, kC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    flash_fwd_kernel<E, kD, kC><<<grid, kThreads, smem, stream>>>(
        q.data_as<E>(), k.data_as<E>(), v.data_as<E>(), out.data_as<E>(), lse.data_as<float>(),
        static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), scale * kLog2e);
    CUDA_CHECK_LAUNCH();
  });
  if (lse_out) *lse_out = std::move(lse);
  return out;
}

// ---------------------------------------------------------------------------------------------
// variant switch (v1: the kernel above; v2: ops/cuda/flash_attention_forward_v2.cu)

namespace {
std::atomic<int> g_fwd_variant{0};  // 0: not decided yet (the environment is read at the first query)
}  // namespace

void set_flash_forward_variant(int variant) {
  OMNIQ_CHECK(variant >= 1 && variant <= 3, "set_flash_forward_variant: variant %d is not 1, 2 or 3", variant);
  g_fwd_variant.store(variant);
}

int flash_forward_variant() {
  return setting_or_env(g_fwd_variant, [] {
    auto set = [](const char* name) {
      const char* env = std::getenv(name);
      return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
    };
    return set("OMNIQ_FLASH_FWD_V1") ? 1 : set("OMNIQ_FLASH_FWD_V2") ? 2 : 3;
  });
}

Tensor flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                               Tensor* lse_out) {
  // D = 64 stays on v1 either way: v1 needs 128 registers there (4 CTAs = 16 warps per SM), v2's
  // 32-row warps 221-241 (8 warps per SM); the 2x fragment reuse is not expected to pay for half
  // the occupancy (not timed).
  const int variant = flash_forward_variant();
  if (variant == 3 && flash_forward_v3_available(q)) return flash_attention_forward_v3(q, k, v, scale, causal, lse_out);
  if (variant != 2 || q.size(3) == 64) return flash_attention_forward_v1(q, k, v, scale, causal, lse_out);
  return flash_attention_forward_v2(q, k, v, scale, causal, lse_out);
}

}  // namespace omniq::cuda
