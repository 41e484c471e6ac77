// The weight fake-quant backward without dx (the weight-only LWC step's) as a streaming kernel, the
// default for 16-bit weights in 16-byte vectors (OMNIQ_FQ_V2_OLD=1 runs fake_quant_backward_kernel
// of fake_quant.cu instead). Same per-group code (fake_quant_group.cuh), so the same dγ/dβ bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ops/cuda/cp_async.cuh"
#include "ops/cuda/fake_quant_group.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda::fq {

namespace {

// ---- v2.1: the backward without dx as a streaming kernel ----
//
// Why: fake_quant_backward_kernel (fake_quant.cu) loads a thread's vectors into registers, computes,
// and exits. While a block computes (the team reductions, the fp64 σ, ≈ 16 instructions per
// element) it has no load in flight, so an SM alternates bursts of loads with bursts of math and reached only 55–64% of DRAM peak (g128)
// and 38% for per-channel rows of 11008 (512-thread blocks at 80 registers: one block per SM).
// Here each block loops over tiles (a tile = the groups one block of fake_quant_backward_kernel owns:
// blockDim/team groups for warp teams, one row for block teams) and keeps kStages tiles in shared
// memory: cp.async puts tile i + kStages − 1 in flight before tile i is computed. Every thread copies
// exactly the vectors (and the σ parameter) it later reads itself, so completion needs only its own
// cp.async.wait_group: no barrier between the copies and the math, and warps run independently.
// The math is the same device code (tile_state_ab, fake_quant_backward_v2) in the same order with the
// same team mapping and block size: dγ/dβ are bitwise those of the kernels of fake_quant.cu (with or without
// dx). Block teams are capped at 64 registers (kBlockTeam), so two 512-thread blocks (rows of
// 1025..2048 vectors: 11008, 13824) share an SM, where the kernel of fake_quant.cu fits one at 80.
// Smem layout of a stage: x packs [cap], dy packs [cap], the lane's raw γ|β [blockDim]; thread t's
// vector j sits at slot j·blockDim + t (consecutive threads, consecutive 16 bytes: conflict-free; for
// a block team the slot is the vector's index in the row).
// SmemPacks, cp_async, copy_async and the commit/wait helpers: ops/cuda/cp_async.cuh.

// Byte size of one stage (host and device agree): cap packs of x and of dy, blockDim floats, 16-aligned.
template <typename TX, typename TG, int kVec>
__host__ __device__ constexpr size_t stream_stage_bytes(int cap, int block) {
  const size_t bytes = static_cast<size_t>(cap) * (sizeof(Pack<TX, kVec>) + sizeof(Pack<TG, kVec>)) + 4u * block;
  return (bytes + 15u) & ~size_t{15};
}

// team > 0: warp teams, tile = blockDim/team groups; team == 0: one group (row) per tile. The launcher
// guarantees n ≤ kItems·team·kVec (warp teams) or n ≤ kItems·blockDim·kVec (block teams): every
// vector is cached, the sweeps' re-read branch never runs.
template <typename TX, typename TG, int kVec, int kItems, int kStages, bool kBlockTeam>
__global__ void __maxnreg__(kBlockTeam ? 64 : 80)
    fake_quant_backward_stream_kernel(const TG* __restrict__ dy, const TX* __restrict__ x,
                                      const float* __restrict__ gamma, const float* __restrict__ beta,
                                      float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t groups, int n,
                                      int team, int cap, Levels L) {
  using PX = Pack<TX, kVec>;
  using PG = Pack<TG, kVec>;
  extern __shared__ __align__(16) unsigned char stages[];
  __shared__ float smem[32 * 2];  // block-team reductions
  const int tid = static_cast<int>(threadIdx.x), block = static_cast<int>(blockDim.x);
  const size_t stage_bytes = stream_stage_bytes<TX, TG, kVec>(cap, block);
  auto xs = [&](int st) { return reinterpret_cast<PX*>(stages + st * stage_bytes); };
  auto gs = [&](int st) { return reinterpret_cast<PG*>(stages + st * stage_bytes + cap * sizeof(PX)); };
  auto ps = [&](int st) {
    return reinterpret_cast<float*>(stages + st * stage_bytes + cap * (sizeof(PX) + sizeof(PG)));
  };
  const int64_t per_tile = team ? block / team : 1;
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  // Puts tile `tile` in flight into stage st; one commit group per call, empty past the end, so the
  // wait below always counts kStages − 1 newer groups.
  auto issue = [&](int64_t tile, int st) {
    if (tile < tiles) {
      const Tile t = make_tile<kVec>(team, groups, n, tile);
      if (gamma) copy_async(ps(st) + tid, ((tid & 1) ? beta : gamma) + t.k);  // t.k is valid even for a tail
      if (t.valid) {
        const TX* xg = x + t.off;
        const TG* gg = dy + t.off;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int c = t.c0 + j * t.step;
          if (c < n) {
            copy_async(xs(st) + j * block + tid, reinterpret_cast<const PX*>(xg + c));
            copy_async(gs(st) + j * block + tid, reinterpret_cast<const PG*>(gg + c));
          }
        }
      }
    }
    cp_async_commit();
  };
  int64_t tile = blockIdx.x;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(tile + st * static_cast<int64_t>(gridDim.x), st);
  for (int it = 0; tile < tiles; ++it, tile += gridDim.x) {  // uniform over the block: shuffles stay legal
    // The stage refilled here was read by this thread in the previous iteration, whose results (the
    // shuffles, the dγ store) depend on those reads: they completed before this is issued.
    issue(tile + (kStages - 1) * static_cast<int64_t>(gridDim.x), (it + kStages - 1) % kStages);
    cp_async_wait<kStages - 1>();
    const int st = it % kStages;
    const Tile t = make_tile<kVec>(team, groups, n, tile);
    const SmemPacks<TX, kVec> xr{xs(st) + tid, block};
    const SmemPacks<TG, kVec> gr{gs(st) + tid, block};
    float a = 1.0f, b = 1.0f;
    if (gamma) lwc_sigmoids_of(ps(st)[tid], t.tp, a, b);
    float own[2];
    const TX* xg = x + t.off;
    const GroupState s = tile_state_ab<kItems, TX, kVec>(t, xg, xr, n, a, b, L, smem, own);
    fake_quant_backward_v2<kItems, false, TX, TG, kVec>(t, s, own, xg, dy + t.off, xr, gr, static_cast<TX*>(nullptr),
                                                        gamma, dgamma, dbeta, n, L, smem);
  }
  cp_async_wait<0>();  // nothing may be in flight into shared memory when the block exits
}

}  // namespace

// The streaming backward without dx (fake_quant_backward_stream_kernel) for 16-bit x in 16-byte
// vectors: warp teams and block teams as group_launch sizes them (≤ 4 vectors a thread), the latter for
// rows of up to 2048 vectors (16384 elements). Returns false where it
// does not apply (the caller runs fake_quant_backward_kernel). The grid is at most what fits on the GPU at once
// (a persistent grid-stride loop), at most one block per tile.
template <typename TX, typename TG>
bool launch_backward_stream(const GroupLaunch& l, const TG* dy, const TX* x, const float* gp, const float* bp,
                            float* dgp, float* dbp, int64_t groups, int n, const Levels& L, CudaContext& ctx) {
  constexpr int kVec = 8;
  const int nvec = n / kVec;
  const bool warp_teams = l.team > 0;
  // group_launch's block and ≤ 4 vectors a thread (cache_items), so every thread sums the same
  // elements in the same order as fake_quant_backward_kernel; longer rows re-read an excess there: not here.
  const int block = static_cast<int>(l.block.x);
  if (!warp_teams && nvec > 4 * block) return false;
  const int cap = warp_teams ? 4 * block : nvec;
  const int stages = fq_stream_stages();
  const size_t smem = stages * stream_stage_bytes<TX, TG, kVec>(cap, block);
  const int optin = ctx.prop.sharedMemPerBlockOptin, sms = ctx.prop.multiProcessorCount;
  if (smem > static_cast<size_t>(optin)) return false;
  auto go = [&](auto kernel) {
    const int occ = stream_blocks_per_sm(reinterpret_cast<const void*>(kernel), ctx.device, block, smem);
    if (occ < 1) return false;
    const int64_t per_tile = warp_teams ? block / l.team : 1;
    const int64_t tiles = (groups + per_tile - 1) / per_tile;
    if (tiles == 0) return true;  // nothing to do
    // The grid whose busiest SM has the fewest tiles (persistent_grid); which block runs which tile
    // does not change the bits.
    const int64_t grid = persistent_grid(tiles, occ, sms);
    kernel<<<static_cast<unsigned int>(grid), block, smem, ctx.stream>>>(dy, x, gp, bp, dgp, dbp, groups, n,
                                                                         warp_teams ? l.team : 0, cap, L);
    CUDA_CHECK_LAUNCH();
    return true;
  };
  if (warp_teams)
    return stages == 3 ? go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 3, false>)
                       : go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 2, false>);
  return stages == 3 ? go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 3, true>)
                     : go(fake_quant_backward_stream_kernel<TX, TG, kVec, 4, 2, true>);
}

template bool launch_backward_stream<__half, float>(const GroupLaunch&, const float*, const __half*, const float*,
                                                    const float*, float*, float*, int64_t, int, const Levels&,
                                                    CudaContext&);
template bool launch_backward_stream<__half, __half>(const GroupLaunch&, const __half*, const __half*, const float*,
                                                     const float*, float*, float*, int64_t, int, const Levels&,
                                                     CudaContext&);
template bool launch_backward_stream<__half, __nv_bfloat16>(const GroupLaunch&, const __nv_bfloat16*, const __half*,
                                                            const float*, const float*, float*, float*, int64_t, int,
                                                            const Levels&, CudaContext&);
template bool launch_backward_stream<__nv_bfloat16, float>(const GroupLaunch&, const float*, const __nv_bfloat16*,
                                                           const float*, const float*, float*, float*, int64_t, int,
                                                           const Levels&, CudaContext&);
template bool launch_backward_stream<__nv_bfloat16, __half>(const GroupLaunch&, const __half*, const __nv_bfloat16*,
                                                            const float*, const float*, float*, float*, int64_t, int,
                                                            const Levels&, CudaContext&);
template bool launch_backward_stream<__nv_bfloat16, __nv_bfloat16>(const GroupLaunch&, const __nv_bfloat16*,
                                                                   const __nv_bfloat16*, const float*, const float*,
                                                                   float*, float*, int64_t, int, const Levels&,
                                                                   CudaContext&);

}  // namespace omniq::cuda::fq
