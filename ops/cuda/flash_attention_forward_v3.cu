// Flash attention forward, variant 3: Hopper warpgroup MMAs (wgmma, sm_90a), D = 128, bf16/f16.
// Same algorithm and numerics as variants 1 and 2 (online softmax in the log2 domain, P rounded to
// 16 bits before P·V, fp32 accumulation, lse in natural log); what changes is how the products run:
//
// CTA = 128 queries = 2 warpgroups of 64; key tiles of 64. Per tile and warpgroup, S = Q·Kᵀ is 8
// wgmma m64n64k16 reading Q and K straight from shared memory (no ldmatrix, no register staging),
// and O += P·V is 4 wgmma m64n128k16 with P from registers (the S accumulators packed to 16 bits are
// the A operand) and V from shared memory as an MN-major operand — the layout K and V are stored in
// is the same (ops/cuda/wgmma.cuh), only the descriptor differs. mma.sync variants re-read every K/V
// fragment through ldmatrix per warp (v1: 64 ldmatrix.x4 per 128 MMAs) and are bound by shared-memory
// bandwidth and latency; wgmma reads each operand once per warpgroup.
// Two CTAs per SM (97 KiB of shared memory each, ≤ 128 registers), so one warpgroup's softmax
// overlaps another's MMAs; the next K/V tile is prefetched with cp.async into the other buffer.
// Causal: a warpgroup skips the key tile that lies entirely after its 64 queries.
#include <climits>

#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_common.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace flash;

constexpr int kQRows = 128;      // queries per CTA (64 per warpgroup)
constexpr int kKRows = 64;       // keys per tile
constexpr int kV3Threads = 256;  // 2 warpgroups
constexpr int kV3D = 128;
constexpr size_t kQBytes = kQRows * kV3D * 2, kKVBytes = kKRows * kV3D * 2;
constexpr size_t kV3Smem = kQBytes + 4 * kKVBytes + 1024;  // + slack to align the tiles to 1024 B

// grid (Hq, ceil(T/128), B); the query tile index runs backwards so the longest causal tiles start first.
template <typename E, bool kCausal>
__global__ void __launch_bounds__(kV3Threads, 2)
    flash_fwd_v3_kernel(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        E* __restrict__ out, float* __restrict__ lse, int seq, int Hq, int Hkv, float scale_log2) {
#ifdef OMNIQ_WGMMA
  using Tag = typename wgmma::TagOf<E>::type;
  constexpr int D = kV3D;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = wgmma::smem_addr(smem_raw);
  unsigned char* sQ = smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u);
  unsigned char* sK = sQ + kQBytes;          // [2][kKVBytes]
  unsigned char* sV = sK + 2 * kKVBytes;     // [2][kKVBytes]
  const uint32_t aQ = wgmma::smem_addr(sQ), aK = wgmma::smem_addr(sK), aV = wgmma::smem_addr(sV);

  const int h = blockIdx.x, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (Hq / Hkv), q0 = qt * kQRows;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int gr = lane >> 2, tq = lane & 3;
  const int64_t ldq = static_cast<int64_t>(Hq) * D, ldk = static_cast<int64_t>(Hkv) * D;
  const E* qg = q + (static_cast<int64_t>(b) * seq + q0) * ldq + static_cast<int64_t>(h) * D;
  const E* kg = k + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const E* vg = v + static_cast<int64_t>(b) * seq * ldk + static_cast<int64_t>(kvh) * D;
  const int n_end = kCausal ? min(seq, q0 + kQRows) : seq;
  const int n_tiles = (n_end + kKRows - 1) / kKRows;
  const int wg_first = q0 + wg * 64;            // this warpgroup's first query
  const int row0 = wg_first + warp * 16 + gr;   // this thread's query rows: row0 and row0 + 8

  load_swizzled<E, kQRows, kV3Threads>(sQ, qg, ldq, seq - q0);
  load_swizzled<E, kKRows, kV3Threads>(sK, kg, ldk, seq);
  load_swizzled<E, kKRows, kV3Threads>(sV, vg, ldk, seq);
  cp_async_commit();

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // log2-domain max; thread-partial sum

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      const int64_t off = static_cast<int64_t>(j + 1) * kKRows * ldk;
      load_swizzled<E, kKRows, kV3Threads>(sK + ((j + 1) & 1) * kKVBytes, kg + off, ldk, seq - (j + 1) * kKRows);
      load_swizzled<E, kKRows, kV3Threads>(sV + ((j + 1) & 1) * kKVBytes, vg + off, ldk, seq - (j + 1) * kKRows);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group done" == tile j ready
    cp_async_wait<1>();
    wgmma::fence_proxy_async();  // this thread's cp.async data → visible to the async proxy (wgmma)
    __syncthreads();
    const int kv0 = j * kKRows;
    if (!kCausal || kv0 <= wg_first + 63) {  // warpgroup-uniform: some key of the tile is visible
      const uint32_t cK = aK + (j & 1) * kKVBytes, cV = aV + (j & 1) * kKVBytes;
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      wgmma::fence_operand(s);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_m64n64k16_ss<0, 0>(s, wgmma::desc_k_major(aQ, kQRows, wg * 64, kk),
                                      wgmma::desc_k_major(cK, kKRows, 0, kk), kk > 0, Tag{});
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operand(s);

      // Online softmax, as variant 1 (only the diagonal tiles and the sequence end need the mask).
      const bool edge = kv0 + kKRows > seq || (kCausal && kv0 + kKRows - 1 > wg_first);
      float alpha[2];
      online_softmax_tile<8, kCausal>(s, kv0, row0, tq, seq, edge, scale_log2, m_run, l_run, alpha);
      rescale_rows<16>(o, alpha);

      // O += P·V over the tile's 4 k16 slices of keys; P's accumulator n-tiles 2t, 2t+1 are slice t's A.
      uint32_t a[4][4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        a[t][0] = pack2<E>(s[8 * t + 0], s[8 * t + 1]);
        a[t][1] = pack2<E>(s[8 * t + 2], s[8 * t + 3]);
        a[t][2] = pack2<E>(s[8 * t + 4], s[8 * t + 5]);
        a[t][3] = pack2<E>(s[8 * t + 6], s[8 * t + 7]);
      }
      wgmma::fence_operand(o);
      wgmma::fence();
#pragma unroll
      for (int t = 0; t < 4; ++t) wgmma::mma_m64n128k16_rs<1>(o, a[t], wgmma::desc_mn_major(cV, kKRows, t), 1, Tag{});
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operand(o);
    }
    __syncthreads();  // everyone is done with buffer j&1 before iteration j+1 refills it
  }

  write_out_lse<E, 16>(
      o, l_run, m_run, row0, tq, seq,
      [&](int row) { return out + (static_cast<int64_t>(b) * seq + row) * ldq + static_cast<int64_t>(h) * D; },
      lse + (static_cast<int64_t>(b) * Hq + h) * seq);
#else
  __trap();  // not built for sm_90a: flash_forward_v3_available() keeps the host from launching this
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launcher

bool flash_forward_v3_available(const Tensor& q) {
#ifdef OMNIQ_CUDA_SM90A
  if (q.size(3) != kV3D || !q.device().is_cuda()) return false;
  const cudaDeviceProp& p = cuda_context(q.device()).prop;
  return p.major == 9 && p.minor == 0;
#else
  (void)q;
  return false;
#endif
}

Tensor flash_attention_forward_v3(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                                  Tensor* lse_out) {
  OMNIQ_CHECK(flash_forward_v3_available(q),
              "flash_attention_forward_v3: needs D = 128 on an sm_90 GPU and a build for sm_90a (got D = %lld)",
              static_cast<long long>(q.size(3)));
  OMNIQ_CHECK(aligned16(v), "flash_attention_forward: v %s is not 16-byte aligned", v.str().c_str());
  const Device dev = q.device();
  cudaStream_t stream = cuda_context(dev).stream;
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), Hkv = k.size(2);
  Tensor out = Tensor::empty(q.shape(), q.dtype(), dev);
  Tensor lse = Tensor::empty(Shape{B, Hq, T}, DType::f32, dev);
  const dim3 grid(static_cast<unsigned>(Hq), static_cast<unsigned>((T + kQRows - 1) / kQRows),
                  static_cast<unsigned>(B));
  flash_dispatch(q.dtype(), kV3D, causal, [&](auto e, auto, auto c) {
    using E = decltype(e);
    constexpr bool kC = decltype(c)::value;
    CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_v3_kernel<E, kC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kV3Smem)));
    flash_fwd_v3_kernel<E, kC><<<grid, kV3Threads, kV3Smem, stream>>>(
        q.data_as<E>(), k.data_as<E>(), v.data_as<E>(), out.data_as<E>(), lse.data_as<float>(),
        static_cast<int>(T), static_cast<int>(Hq), static_cast<int>(Hkv), scale * kLog2e);
    CUDA_CHECK_LAUNCH();
  });
  if (lse_out) *lse_out = std::move(lse);
  return out;
}

}  // namespace omniq::cuda
