// The fused LWC step (ops/fake_quant_lwc_update.h) as a streaming kernel: the default for 16-bit
// weights in 16-byte vectors in warp teams (g32..g128) and in 512-thread block teams (per-channel rows
// of 8193..16384 elements); OMNIQ_FQ_V2_OLD=1 runs the register kernel of fake_quant_lwc_update.cu
// everywhere. Modelled on the unfused streaming backward
// (fake_quant_backward_stream.cu, 66% of DRAM peak): a persistent grid-stride loop over tiles (a tile
// = the groups one block of the register kernel owns: blockDim/team groups for warp teams, one row
// for block teams) with kStages tiles in shared memory, cp.async putting tile i + kStages − 1 in
// flight while tile i is computed. Every thread copies exactly the vectors (and the raw γ|β, m, v of
// its lane) it later reads itself, so its own cp.async.wait_group is all the synchronisation needed;
// the stage it refills was last read by this thread in the previous iteration, whose results (the ŵ
// stores, the shuffles) depended on those reads, so in-order issue had completed them.
// Same team mapping, block size and per-group code (lwc_update_group) as the register kernel: the
// same bits. Compared with the unfused backward the stage holds two more floats per thread (m, v), and
// the tile's ŵ is written from the stage after the AdamW update: 6 bytes per element of DRAM traffic
// for f16 w, bf16 dŴ, bf16 ŵ.
// Smem layout of a stage: x packs [cap], dy packs [cap], raw γ|β [blockDim], m [blockDim], v [blockDim];
// thread t's vector j sits at slot j·blockDim + t (conflict-free 16-byte accesses).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/cp_async.cuh"
#include "ops/cuda/fake_quant_group.cuh"
#include "ops/cuda/fake_quant_lwc_update.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda::fq {

namespace {

// Byte size of one stage (host and device agree), 16-aligned.
template <typename TX, typename TG, int kVec>
__host__ __device__ constexpr size_t lwc_stage_bytes(int cap, int block) {
  const size_t bytes = static_cast<size_t>(cap) * (sizeof(Pack<TX, kVec>) + sizeof(Pack<TG, kVec>)) + 12u * block;
  return (bytes + 15u) & ~size_t{15};
}

// The launcher guarantees n ≤ kItems·team·kVec (warp teams) or n ≤ kItems·blockDim·kVec (block teams):
// every vector is in the stage, the sweeps' re-read branch never runs. Register caps as the unfused
// streaming backward (3 blocks of 256 threads, or 2 of 512, per SM).
template <typename TX, typename TG, typename TY, int kVec, int kItems, int kStages, bool kBlockTeam>
__global__ void __maxnreg__(kBlockTeam ? 64 : 80)
    fake_quant_lwc_update_stream_kernel(const TG* __restrict__ dy, const TX* __restrict__ x, TY* __restrict__ y,
                                        LwcOptPtrs o, int64_t groups, int n, int team, int cap, Levels L) {
  using PX = Pack<TX, kVec>;
  using PG = Pack<TG, kVec>;
  extern __shared__ __align__(16) unsigned char stages[];
  __shared__ float smem[32 * 2];  // block-team reductions
  const int tid = static_cast<int>(threadIdx.x), block = static_cast<int>(blockDim.x);
  const size_t stage_bytes = lwc_stage_bytes<TX, TG, kVec>(cap, block);
  auto xs = [&](int st) { return reinterpret_cast<PX*>(stages + st * stage_bytes); };
  auto gs = [&](int st) { return reinterpret_cast<PG*>(stages + st * stage_bytes + cap * sizeof(PX)); };
  auto ps = [&](int st) {  // [3][block]: raw parameter, m, v
    return reinterpret_cast<float*>(stages + st * stage_bytes + cap * (sizeof(PX) + sizeof(PG)));
  };
  const int64_t per_tile = team ? block / team : 1;
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  // Puts tile `tile` in flight into stage st; one commit group per call, empty past the end, so the
  // wait below always counts kStages − 1 newer groups.
  auto issue = [&](int64_t tile, int st) {
    if (tile < tiles) {
      const Tile t = make_tile<kVec>(team, groups, n, tile);
      float* pst = ps(st);
      copy_async(pst + tid, lane_param(o) + t.k);  // t.k is valid even for a tail
      copy_async(pst + block + tid, lane_m(o) + t.k);
      copy_async(pst + 2 * block + tid, lane_v(o) + t.k);
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
    issue(tile + (kStages - 1) * static_cast<int64_t>(gridDim.x), (it + kStages - 1) % kStages);
    cp_async_wait<kStages - 1>();
    const int st = it % kStages;
    const Tile t = make_tile<kVec>(team, groups, n, tile);
    const SmemPacks<TX, kVec> xr{xs(st) + tid, block};
    const SmemPacks<TG, kVec> gr{gs(st) + tid, block};
    const float* pst = ps(st);
    lwc_update_group<kItems, TX, TG, TY, kVec>(t, x + t.off, dy + t.off, y + t.off, xr, gr, pst[tid],
                                               pst[block + tid], pst[2 * block + tid], o, n, L, smem);
  }
  cp_async_wait<0>();  // nothing may be in flight into shared memory when the block exits
}

// Threads per block of the warp-team kernel: group_launch's 256 (64 teams of 4 lanes for g128), or 128 /
// 64 with OMNIQ_LWC_TEAM_BLOCK=128 / 64 (A/B switch). A warp team's sum does not depend on how many
// teams share a block (same lanes, same elements, same shuffles), so the bits are the same; smaller
// blocks give more, smaller tiles per weight: more rounds of the persistent loop, so the prologue
// (first tile's load, nothing to overlap) and epilogue (last tile's math) weigh less on small weights.
int lwc_team_block() {
  const char* e = std::getenv("OMNIQ_LWC_TEAM_BLOCK");
  if (e && std::strcmp(e, "128") == 0) return 128;
  if (e && std::strcmp(e, "64") == 0) return 64;
  return 256;
}

}  // namespace

template <typename TX, typename TG, typename TY>
bool launch_lwc_update_stream(const GroupLaunch& l, const TG* dy, const TX* x, TY* y, const LwcOptPtrs& o,
                              int64_t groups, int n, const Levels& L, CudaContext& ctx) {
  constexpr int kVec = 8;
  const int nvec = n / kVec;
  const bool warp_teams = l.team > 0;
  // group_launch's block and ≤ 4 vectors a thread (cache_items of the backward): every thread sums
  // the same elements in the same order as the register kernel and the unfused backward.
  // Block teams: the block IS the team (its size fixes the summation order). Warp teams: any multiple
  // of 32 (lwc_team_block); the team of `l.team` lanes is what fixes the bits.
  const int block = warp_teams ? lwc_team_block() : static_cast<int>(l.block.x);
  if (!warp_teams && nvec > 4 * block) return false;
  // Block teams of fewer than 512 threads (rows of ≤ 1024 vectors: ≤ 8192 16-bit elements) run the
  // register kernel: H100, 7B per-channel, f16 w (bench_lwc_update): rows of 4096 take 45 µs there vs 56
  // µs here ([4096x4096]) and 109 vs 120 µs ([11008x4096]); rows of 11008 (512 threads) 160 here vs 183.
  if (!warp_teams && block < kMaxBlock) return false;
  const int cap = warp_teams ? 4 * block : nvec;
  // 2 stages (one tile computed while the next is in flight), or 3 with OMNIQ_FQ_STAGES=3 (the unfused
  // streaming backward's A/B switch; same bits either way).
  const int stages = fq_stream_stages();
  const size_t smem = stages * lwc_stage_bytes<TX, TG, kVec>(cap, block);
  const int optin = ctx.prop.sharedMemPerBlockOptin, sms = ctx.prop.multiProcessorCount;
  if (smem > static_cast<size_t>(optin)) return false;
  auto go = [&](auto kernel) {
    const int occ = stream_blocks_per_sm(reinterpret_cast<const void*>(kernel), ctx.device, block, smem);
    if (occ < 1) return false;
    const int64_t per_tile = warp_teams ? block / l.team : 1;
    const int64_t tiles = (groups + per_tile - 1) / per_tile;
    if (tiles == 0) return true;
    // The grid whose busiest SM has the fewest tiles (persistent_grid); which block runs which tile
    // does not change the bits.
    const int64_t grid = persistent_grid(tiles, occ, sms);
    kernel<<<static_cast<unsigned int>(grid), block, smem, ctx.stream>>>(dy, x, y, o, groups, n,
                                                                         warp_teams ? l.team : 0, cap, L);
    CUDA_CHECK_LAUNCH();
    return true;
  };
  if (warp_teams)
    return stages == 3 ? go(fake_quant_lwc_update_stream_kernel<TX, TG, TY, kVec, 4, 3, false>)
                       : go(fake_quant_lwc_update_stream_kernel<TX, TG, TY, kVec, 4, 2, false>);
  return stages == 3 ? go(fake_quant_lwc_update_stream_kernel<TX, TG, TY, kVec, 4, 3, true>)
                     : go(fake_quant_lwc_update_stream_kernel<TX, TG, TY, kVec, 4, 2, true>);
}

// dy in ŵ's dtype or f32, for ŵ f32 | bf16 | f16 (the launcher's dispatch in fake_quant_lwc_update.cu).
#define OMNIQ_LWC_STREAM(TX, TG, TY)                                                                          \
  template bool launch_lwc_update_stream<TX, TG, TY>(const GroupLaunch&, const TG*, const TX*, TY*,           \
                                                     const LwcOptPtrs&, int64_t, int, const Levels&, CudaContext&);
#define OMNIQ_LWC_STREAM_X(TX)                     \
  OMNIQ_LWC_STREAM(TX, float, float)               \
  OMNIQ_LWC_STREAM(TX, float, __nv_bfloat16)       \
  OMNIQ_LWC_STREAM(TX, __nv_bfloat16, __nv_bfloat16) \
  OMNIQ_LWC_STREAM(TX, float, __half)              \
  OMNIQ_LWC_STREAM(TX, __half, __half)
OMNIQ_LWC_STREAM_X(__half)
OMNIQ_LWC_STREAM_X(__nv_bfloat16)
#undef OMNIQ_LWC_STREAM_X
#undef OMNIQ_LWC_STREAM

}  // namespace omniq::cuda::fq
