// The LET-fused weight fake-quant backward as a row-tile kernel (semantics: ops/fake_quant_let.h; CPU
// twin: ops/cpu/fake_quant_let.cpp). The default; OMNIQ_FQ_LET_BWD_OLD=1 (or OMNIQ_FQ_V1=1) runs
// fq_let_backward_kernel of fake_quant_let.cu instead (the dispatch is there).
//
// Why: the block-per-row kernel pays per row (16 elements a thread) three block reductions, an fp64
// σ in every thread and the group math, ≈ 20 instructions an element on top of ≈ 25 of real work,
// at 110 registers: 26% of DRAM peak on an H100. Here 8 warps work on a tile of ≤ 8 rows in four
// steps with two barriers:
//   A  warp w: row w's max/min of u (lane-strided over the row, a warp shuffle reduction, no
//      barrier), σ(γ), σ(β), the quantizer state → shared memory. The max/min come from those of
//      v = w·c: u = v ÷ r and v · r are monotone in v under round-to-nearest, so max u = u(max v)
//      (or u(min v) for r < 0) bit for bit, and step A costs ≈ 4 instructions an element.
//   B  every thread: its fixed columns (vectors tid, tid + 256, ...) of every row of the tile:
//      u, the STE decision and ∂x̂/∂scale (elem_grad, the same helpers and bits as the other
//      kernels), dscale and Σ du·u partials per (row, thread) → shared memory, dc accumulated in
//      registers across all tiles of the block (fixed columns), and whether the thread holds the
//      row's max/min (tie counts by integer shared atomics: exact, so order-free).
//   C  warp w: row w's sums in a fixed order, group_grad, dγ, dβ, dr, the max/min shares.
//   D  (after the next tile's barrier) threads that hold a max/min element add its share to dc.
// du = dy·STE + shares: the STE part is known in B, the shares (row totals) only in C; they touch
// only tie elements, so dr gets them in closed form (share · n_ties · x_max) and dc from the threads
// that hold ties (constant or all-zero rows: every thread, same path).
// Cost: 4 bytes of DRAM per element as before (w 2 + dy 2; step B re-reads w from L2, which the
// same block read microseconds earlier). Instructions per element ≈ 4 (A) + ≈ 21 (B) with column
// scales only (most of a 7B block's LET weights), + 3 for · r, + ≈ 8 for ÷ r (B's IEEE division);
// per-row/per-tile work is spread over 8 rows × 16 elements a thread, no barrier sits in an element
// loop, step B's rows arrive by cp.async one row ahead (two with an L2 prefetch), step A's by an
// L2 prefetch of the whole row (and of the next tile's, halfway through step B). ptxas (sm_90a,
// n ≤ 4096): 128 registers, no spills, 2 blocks = 16 warps per SM (the default); an 80-register
// build (3 blocks, 24 warps, ≈ 128 spilled bytes) is there for A/B (OMNIQ_FQ_LET_BWD_CTAS=3).
// Column partials: one [n] row per block (264 on an H100, as before), summed by col_sum in a fixed
// order: bitwise repeatable, no float atomics (bits depend on the grid, i.e. the GPU model).
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "ops/cuda/fake_quant_common.cuh"
#include "ops/cuda/fake_quant_let_tile.cuh"
#include "ops/fake_quant_let.h"
#include "ops/reduce.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

using namespace fq;
using namespace let_tile;

// kMinBlocks: blocks per SM the registers must allow (2: ≤ 128 registers, the default; 3: ≤ 80).
template <typename TX, typename TG, int kItems, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fq_let_bwd_tile_kernel(const TG* __restrict__ dy, const TX* __restrict__ w, const float* __restrict__ col,
                           const float* __restrict__ row, bool divide, const float* __restrict__ gamma,
                           const float* __restrict__ beta, float* __restrict__ dgamma, float* __restrict__ dbeta,
                           float* __restrict__ drow, float* __restrict__ dcol_part, int rows, int n, Levels L) {
  using PX = Pack<TX, kV>;
  using PG = Pack<TG, kV>;
  using P4 = Pack<float, 4>;
  // Dynamic: column scales (2 × [nvec] × 16 B), then 2 stages of step B's rows (thread t's vector k
  // of w at xs[k·256 + t], of dy at gs[k·256 + t]: consecutive threads, consecutive bytes).
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ RowInfo infos[2][kRows];                        // by tile parity (step D reads the previous)
  __shared__ float part_s[2][kRows][kThreads];               // step B → C: per-thread ds, dr of each row
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int nvec = n / kV;
  const int mode = !row ? kNoRow : divide ? kDivide : kMultiply;
  P4* c_lo = reinterpret_cast<P4*>(dyn_smem);
  P4* c_hi = c_lo + nvec;
  for (int v = tid; v < nvec; v += kThreads) {
    P4 a, b;
#pragma unroll
    for (int i = 0; i < 4; ++i) a.v[i] = b.v[i] = 1.0f;  // w · 1 = w exactly: no column scale
    if (col) {
      a = load_pack<float, 4>(col + v * kV);
      b = load_pack<float, 4>(col + v * kV + 4);
    }
    c_lo[v] = a;
    c_hi[v] = b;
  }
  const ColScales cs{c_lo, c_hi};

  // The block's rows, balanced to ±1 over the grid, in tiles of ≤ 8 rows of (near) equal size.
  // (int rows: the launcher checks rows < 2^31; addresses are computed in 64 bits.)
  const int64_t nb = gridDim.x, bi = blockIdx.x;
  const int rb = static_cast<int>(bi * rows / nb), cnt = static_cast<int>((bi + 1) * rows / nb) - rb;
  const int ntiles = (cnt + kRows - 1) / kRows;
  auto tile_start = [&](int j) { return rb + static_cast<int>(static_cast<int64_t>(j) * cnt / ntiles); };

  float cacc[kItems][kV];
#pragma unroll
  for (int k = 0; k < kItems; ++k)
#pragma unroll
    for (int i = 0; i < kV; ++i) cacc[k][i] = 0.0f;

  // Step B's rows go through shared memory by cp.async, one row ahead; a thread copies exactly the
  // vectors it reads itself, so its own cp.async.wait_group is all the synchronisation they need.
  unsigned char* stage0 = dyn_smem + static_cast<size_t>(nvec) * 2 * sizeof(P4);
  constexpr size_t kStageBytes = stage_bytes<TX, TG, kItems>();
  auto xs_of = [&](int st) { return reinterpret_cast<PX*>(stage0 + st * kStageBytes) + tid; };
  auto gs_of = [&](int st) {
    return reinterpret_cast<PG*>(stage0 + st * kStageBytes + kThreads * kItems * sizeof(PX)) + tid;
  };
  auto issue_row = [&](int r, int st) {  // one commit group per call
    PX* xs = xs_of(st);
    PG* gs = gs_of(st);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int v = tid + k * kThreads;
      if (v < nvec) {
        copy_async(xs + k * kThreads, reinterpret_cast<const PX*>(w + static_cast<int64_t>(r) * n + v * kV));
        copy_async(gs + k * kThreads, reinterpret_cast<const PG*>(dy + static_cast<int64_t>(r) * n + v * kV));
      }
    }
    cp_async_commit();
  };

  // L2 prefetches (no registers held): a warp's lanes cover a row of w, 128 bytes each; one thread in
  // 4 the 16–32 bytes of dy it copies next (step B's DRAM reads get two rows of lead, not one).
  auto prefetch_row = [&](const TX* wr) {
    const char* p = reinterpret_cast<const char*>(wr);
    for (int off = lane * 128; off < n * static_cast<int>(sizeof(TX)); off += 32 * 128) prefetch_l2(p + off);
  };
  auto prefetch_dy = [&](int r) {
    if ((tid & 3) != 0) return;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int v = tid + k * kThreads;
      if (v < nvec) prefetch_l2(dy + static_cast<int64_t>(r) * n + v * kV);
    }
  };

  // ---- A: row (row0 + warp)'s state ----
  auto step_a = [&](int row0, int nrows, RowInfo* info) {
    if (warp >= nrows) return;  // warp-uniform
    const int r = row0 + warp;
    const TX* wr = w + static_cast<int64_t>(r) * n;
    const float rs = row ? row[r] : 1.0f;
    prefetch_row(wr);                      // the loads below come in batches: later ones hit L2
    float mx = -INFINITY, mn = -INFINITY;  // max of t and of −t
    auto sweep = [&](auto of_u_c) {        // t = v = w·c, or u where r breaks monotonicity (0, ±inf, NaN)
      constexpr bool kOfU = decltype(of_u_c)::value;
      constexpr int kA = 8 / static_cast<int>(sizeof(TX));  // vectors in flight per lane
      for (int v0 = lane; v0 < nvec; v0 += 32 * kA) {
        PX xp[kA];
#pragma unroll
        for (int k = 0; k < kA; ++k)
          if (v0 + 32 * k < nvec) xp[k] = load_pack<TX, kV>(wr + (v0 + 32 * k) * kV);
#pragma unroll
        for (int k = 0; k < kA; ++k) {
          const int v = v0 + 32 * k;
          if (v >= nvec) break;
          float c[kV];
          cs.get(v, c);
#pragma unroll
          for (int i = 0; i < kV; ++i) {
            float t = __fmul_rn(ld_f32(xp[k].v[i]), c[i]);
            if constexpr (kOfU) t = divide ? __fdiv_rn(t, rs) : __fmul_rn(t, rs);
            mx = fmaxf(mx, t);
            mn = fmaxf(mn, -t);
          }
        }
      }
    };
    const bool via_v = !row || (isfinite(rs) && rs != 0.0f);
    if (via_v) sweep(std::false_type{});
    else sweep(std::true_type{});
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      mn = fmaxf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    }
    float xmax = mx, xmin = -mn;
    if (row && via_v) {  // u of the extreme v's; r < 0 swaps them
      const float u_hi = divide ? __fdiv_rn(mx, rs) : __fmul_rn(mx, rs);
      const float u_lo = divide ? __fdiv_rn(-mn, rs) : __fmul_rn(-mn, rs);
      xmax = rs > 0.0f ? u_hi : u_lo;
      xmin = rs > 0.0f ? u_lo : u_hi;
    }
    float a, b;
    lwc_sigmoids(gamma, beta, r, TeamPos{false, 32, lane, r}, a, b);
    const GroupState s = group_state(xmax, xmin, a, b, L);
    if (lane == 0) {
      RowInfo& I = info[warp];
      const float rcp = __frcp_rn(s.scale);
      const SteBounds B = ste_bounds(s, L);
      const float dvf = !row ? 1.0f : divide ? 1.0f / rs : rs;
      I.q = RowQ{s.xmax, s.xmin, s.scale, rcp, B.lo, B.hi, rs, dvf};
      I.s = s;
      I.fast = fast_div_ok(s.xmax, s.xmin, rcp) ? 1 : 0;
      I.nmax = 0;
      I.nmin = 0;
    }
  };

  // ---- B: one row of the tile (rr) from the thread's cached vectors; returns its tie bit ----
  auto process = [&](int rr, RowInfo* info, int st) -> uint32_t {
    const PX* xs = xs_of(st);
    RowInfo& I = info[rr];
    const RowQ q = I.q;
    const bool fast = I.fast != 0;
    float ds = 0.0f, dr = 0.0f, mx = -INFINITY, mn = INFINITY;
    uint32_t tie = 0;
    auto run = [&](auto mode_c) {
      constexpr int kMode = decltype(mode_c)::value;
      if (fast) row_body<kMode, true, TX, TG, kItems>(xs, gs_of(st), q, cs, tid, nvec, cacc, ds, dr, mx, mn);
      else row_body<kMode, false, TX, TG, kItems>(xs, gs_of(st), q, cs, tid, nvec, cacc, ds, dr, mx, mn);
      if (mx == q.xmax || mn == q.xmin) {  // rare: this thread holds the row's max or min
        int cmax = 0, cmin = 0;
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
          const int v = tid + k * kThreads;
          if (v >= nvec) continue;
          float c[kV];
          cs.get(v, c);
          const PX x = xs[k * kThreads];
#pragma unroll
          for (int i = 0; i < kV; ++i) {
            const float u = let_u<kMode>(__fmul_rn(ld_f32(x.v[i]), c[i]), q.r);
            cmax += u == q.xmax ? 1 : 0;
            cmin += u == q.xmin ? 1 : 0;
          }
        }
        if (cmax) atomicAdd(&I.nmax, cmax);
        if (cmin) atomicAdd(&I.nmin, cmin);
        tie = 1u << rr;
      }
    };
    if (mode == kDivide) run(std::integral_constant<int, kDivide>{});
    else if (mode == kMultiply) run(std::integral_constant<int, kMultiply>{});
    else run(std::integral_constant<int, kNoRow>{});
    part_s[0][rr][tid] = ds;
    part_s[1][rr][tid] = dr;
    return tie;
  };
  // Row rr + 1 is put in flight before row rr is computed (row 0 of the tile before step A). The
  // stage refilled was read by this thread for row rr − 1, whose results (the part_s stores) depend
  // on those reads: they completed before the refill is issued.
  // Halfway, warp w prefetches row w of the next tile for its step A.
  auto step_b = [&](int row0, int nrows, RowInfo* info, int next0, int next_rows) -> uint32_t {
    uint32_t ties = 0;
#pragma unroll 1
    for (int rr = 0; rr < nrows; ++rr) {
      if (rr + 2 < nrows) prefetch_dy(row0 + rr + 2);
      if (rr == nrows / 2 && warp < next_rows) prefetch_row(w + static_cast<int64_t>(next0 + warp) * n);
      if (rr + 1 < nrows) issue_row(row0 + rr + 1, (rr + 1) & 1);
      else cp_async_commit();  // an empty group keeps the count below uniform
      cp_async_wait<1>();      // row rr's group is complete
      ties |= process(rr, info, rr & 1);
    }
    return ties;
  };

  // ---- C: row (row0 + warp)'s totals (fixed order), dγ, dβ, dr, the shares ----
  auto step_c = [&](int row0, int nrows, RowInfo* info) {
    if (warp >= nrows) return;
    const int r = row0 + warp;
    float ds = 0.0f, dr = 0.0f;
#pragma unroll
    for (int j = 0; j < kThreads / 32; ++j) {
      ds += part_s[0][warp][lane + 32 * j];
      dr += part_s[1][warp][lane + 32 * j];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // xor butterfly: every lane ends with the same bits
      ds += __shfl_xor_sync(0xffffffffu, ds, o);
      dr += __shfl_xor_sync(0xffffffffu, dr, o);
    }
    if (lane != 0) return;
    RowInfo& I = info[warp];
    const GroupGrad gg = group_grad(I.s, ds, L, gamma != nullptr);
    if (gamma) {
      dgamma[r] = gg.dgamma;
      dbeta[r] = gg.dbeta;
    }
    // Every element equal to the max (min) gets dxmax / n_max (dxmin / n_min) on top of its STE term.
    const float smax = I.nmax ? gg.dxmax / static_cast<float>(I.nmax) : 0.0f;
    const float smin = I.nmin ? gg.dxmin / static_cast<float>(I.nmin) : 0.0f;
    if (drow) {  // ÷ r: du/dr = −u/r; · r: du/dr = v = u/r
      const float tie_term =
          smax * (static_cast<float>(I.nmax) * I.q.xmax) + smin * (static_cast<float>(I.nmin) * I.q.xmin);
      const float rinv = 1.0f / I.q.r;
      drow[r] = (dr + tie_term) * (divide ? -rinv : rinv);
    }
    I.smax = smax * I.q.dvf;
    I.smin = smin * I.q.dvf;
  };

  // ---- D: the shares of the tie elements this thread holds (rows flagged in step B) into dc ----
  auto step_d = [&](int row0, const RowInfo* info, uint32_t ties) {
    while (ties) {
      const int rr = __ffs(ties) - 1;
      ties &= ties - 1;
      const RowInfo& I = info[rr];
      const TX* wr = w + static_cast<int64_t>(row0 + rr) * n;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int v = tid + k * kThreads;
        if (v >= nvec) continue;
        const PX xp = load_pack<TX, kV>(wr + v * kV);
        float c[kV];
        cs.get(v, c);
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          const float wf = ld_f32(xp.v[i]);
          float u = __fmul_rn(wf, c[i]);
          if (mode != kNoRow) u = divide ? __fdiv_rn(u, I.q.r) : __fmul_rn(u, I.q.r);
          if (u == I.q.xmax || u == I.q.xmin) {
            const float share = (u == I.q.xmax ? I.smax : 0.0f) + (u == I.q.xmin ? I.smin : 0.0f);
            cacc[k][i] = __fmaf_rn(share, wf, cacc[k][i]);
          }
        }
      }
    }
  };

  __syncthreads();  // the column scales are staged
  uint32_t ties = 0;
  int prev_row0 = 0;
#pragma unroll 1
  for (int j = 0; j < ntiles; ++j) {
    const int row0 = tile_start(j), nrows = tile_start(j + 1) - row0;
    RowInfo* info = infos[j & 1];
    issue_row(row0, 0);  // step B's first row, in flight during step A
    if (nrows > 1) prefetch_dy(row0 + 1);
    step_a(row0, nrows, info);
    __syncthreads();  // states ready; the previous tile's shares too
    if (j > 0) step_d(prev_row0, infos[(j - 1) & 1], ties);
    const int next0 = tile_start(j + 1);  // the next tile (none after the last: 0 rows)
    const int next_rows = j + 1 < ntiles ? tile_start(j + 2) - next0 : 0;
    ties = step_b(row0, nrows, info, next0, next_rows);
    __syncthreads();  // partial sums and tie counts ready
    step_c(row0, nrows, info);
    prev_row0 = row0;
  }
  cp_async_wait<0>();  // (all consumed already; nothing may be in flight at exit)
  __syncthreads();
  if (ntiles > 0) step_d(prev_row0, infos[(ntiles - 1) & 1], ties);
  if (!dcol_part) return;
  float* part = dcol_part + bi * n;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int v = tid + k * kThreads;
    if (v < nvec) store_pack<float, kV>(part + v * kV, cacc[k]);
  }
}

// Blocks per SM of `kernel` with `smem` dynamic bytes, cached per (kernel, device, smem): runs in the
// first (eager) step, never in a graph capture. The attribute gets the kernel's largest need.
int tile_blocks_per_sm(const void* kernel, int device, size_t smem, size_t max_smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem)));
  int occ = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, smem));
  cache.emplace(key, occ);
  return occ;
}

// OMNIQ_FQ_LET_BWD_CTAS=k (A/B knob, read once): k ≥ 3 runs the 80-register build (3 blocks per SM
// for n ≤ 4096, a few spilled bytes), k = 1 or 2 caps the blocks per SM; unset: 0.
int ctas_per_sm_env() {
  static const int k = [] {
    const char* e = std::getenv("OMNIQ_FQ_LET_BWD_CTAS");
    const int v = e ? std::atoi(e) : 0;
    return v > 0 ? v : 0;
  }();
  return k;
}

}  // namespace

// Launcher of the tile kernel, called by fake_quant_let_backward (fake_quant_let.cu) with validated
// arguments. Returns false where it does not apply (the caller runs the block-per-row kernel): a
// pointer not 16-byte aligned (it reads 8 elements of w and dy at a time), rows over 8192.
bool fake_quant_let_backward_tiled(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                                   const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g) {
  const char* op = "fake_quant_let_backward";
  const int64_t rows = w.size(0), n = w.size(1), nvec = n / kV;
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  if (n % kV != 0 || nvec > 4 * kThreads || rows < 1 || rows > INT32_MAX || !aligned(w.data()) || !aligned(dy.data()) ||
      (let.col && !aligned(let.col->data())))
    return false;
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(w.device());
  const float* col = let.col ? let.col->data_as<const float>() : nullptr;
  const float* row = let.row ? let.row->data_as<const float>() : nullptr;
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  float* dgp = gamma ? g.dgamma.data_as<float>() : nullptr;
  float* dbp = beta ? g.dbeta.data_as<float>() : nullptr;
  float* drp = let.row ? g.drow.data_as<float>() : nullptr;
  const size_t cbytes = static_cast<size_t>(nvec) * 2 * sizeof(Pack<float, 4>);
  Tensor part;
  dispatch_float(w.dtype(), op, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_float(dy.dtype(), op, [&](auto gt) {
      using TG = typename decltype(gt)::type;
      auto go = [&](auto kernel, auto items_c) {
        constexpr int kItems = decltype(items_c)::value;
        // column scales + 2 row stages; max_smem: the widest row of this kItems
        const size_t stages = 2 * stage_bytes<TX, TG, kItems>();
        const size_t smem = cbytes + stages;
        const size_t max_smem = static_cast<size_t>(kItems) * kThreads * 2 * sizeof(Pack<float, 4>) + stages;
        const int occ = tile_blocks_per_sm(reinterpret_cast<const void*>(kernel), ctx.device, smem, max_smem);
        OMNIQ_CHECK(occ >= 1, "%s: the tile kernel does not fit on this GPU", op);
        const int cap = ctas_per_sm_env() ? std::min(occ, ctas_per_sm_env()) : occ;
        const int64_t slots = static_cast<int64_t>(cap) * ctx.prop.multiProcessorCount;
        // At least a full tile of rows per block where the weight allows (short weights: fewer blocks).
        const int64_t grid = std::max<int64_t>(1, std::min(slots, (rows + kRows - 1) / kRows));
        part = let.col ? Tensor::empty({grid, n}, DType::f32, w.device()) : Tensor();
        kernel<<<static_cast<unsigned>(grid), kThreads, smem, ctx.stream>>>(
            dy.data_as<const TG>(), w.data_as<const TX>(), col, row, let.row_divide, gp, bp, dgp, dbp, drp,
            let.col ? part.data_as<float>() : nullptr, static_cast<int>(rows), static_cast<int>(n), L);
        CUDA_CHECK_LAUNCH();
      };
      // Default: 2 blocks of 128 registers per SM (16 warps, no spills); n ≤ 4096 with
      // OMNIQ_FQ_LET_BWD_CTAS ≥ 3: 3 blocks of 80 registers (24 warps; ptxas spills ≈ 128 bytes).
      constexpr auto k2 = std::integral_constant<int, 2>{};
      if (nvec > 2 * kThreads) go(fq_let_bwd_tile_kernel<TX, TG, 4, 2>, std::integral_constant<int, 4>{});
      else if (ctas_per_sm_env() >= 3) go(fq_let_bwd_tile_kernel<TX, TG, 2, 3>, k2);
      else go(fq_let_bwd_tile_kernel<TX, TG, 2, 2>, k2);
    });
  });
  if (let.col) g.dcol = col_sum(part);  // fixed-order sum of the per-block partials
  return true;
}

}  // namespace omniq::cuda
