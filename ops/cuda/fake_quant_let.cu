// CUDA LET-fused weight fake-quant (semantics: ops/fake_quant_let.h; CPU twin:
// ops/cpu/fake_quant_let.cpp, which it matches bit for bit in ŵ).
//
// Layout: one thread block owns one row of w (the quantization group: per-channel only), each thread
// ≤ kItems 16-byte vectors of it in registers (16 elements a thread for rows ≤ 4096, else 32; n ≤
// 8192 = 256 threads × 32), loaded before use so they are all in flight at once; the transformed
// values u = (w·c) ∘ r are computed once and kept in registers too.
//
// Backward (the default is now the tile kernel of fake_quant_let_backward.cu; the one below runs with
// OMNIQ_FQ_LET_BWD_OLD=1, or OMNIQ_FQ_V1=1 in its v1 form, and where the tile kernel does not apply):
// the row's dscale and tie counts (team sums), dγ, dβ and dr (row sums), and the column
// gradient dc, which sums over all rows: each block walks rows blockIdx.x, +gridDim.x, ... (loading
// the next row while it works on this one) with its threads on fixed columns, so a thread
// accumulates its columns' dc in registers across the rows it visits and the block writes one
// partial row [n] at the end; col_sum adds the partials in a fixed order. No atomics: the result is
// bitwise reproducible. (The row → block assignment depends on how many blocks fit per SM, so bits
// may differ between GPU models, not between runs.)
// Napkin math (H100 ≈ 3 TB/s, LLaMA-7B block, 6 LET-scaled weights = 157 M elements, f16 w, bf16 dy):
//   forward 2 + 2 B/elem ≈ 0.21 ms; backward 2 + 2 B/elem ≈ 0.21 ms, against ≈ 3 ms for the op
// chain it replaces (several f32 weight-sized passes each way). Measured: the kernels are
// instruction-bound (one exact division per element for the quantizer, one more for ÷ r rows), at
// 17–43% of DRAM peak under ncu (docs/performance.md). v2 (the default; OMNIQ_FQ_V1=1 runs v1): the
// quantizer's division by div_by_scale (fake_quant_common.cuh: exact, same bits), the backward's
// STE terms from one clamp and its max/min tie bookkeeping only in the threads that hold the row's
// max/min. The ÷ r of the transform stays an IEEE division: its operands have no group bound to
// guard a fast path with before u is known.
#include <algorithm>
#include <cstdlib>

#include "ops/cuda/fake_quant_common.cuh"
#include "ops/fake_quant_let.h"
#include "ops/reduce.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

// The tile backward (fake_quant_let_backward.cu); false where it does not apply.
bool fake_quant_let_backward_tiled(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                                   const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g);

namespace {

using namespace fq;

// Which backward runs: the tile kernel of fake_quant_let_backward.cu (default), or with
// OMNIQ_FQ_LET_BWD_OLD=1 the block-per-row fq_let_backward_kernel below (A/B switch, read once like
// OMNIQ_LET_WIDE; OMNIQ_FQ_V1=1, read per launch, also selects the old kernel, in its v1 form).
bool let_bwd_old_requested() {
  static const bool old = [] {
    const char* e = std::getenv("OMNIQ_FQ_LET_BWD_OLD");
    return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
  }();
  return old;
}

constexpr int kLetMaxBlock = 256;

// The fused transform of one element: v = w·c, u = v ÷ r or v · r (explicitly rounded, no FMA).
struct LetRow {
  const float* col;  // null: no column scale
  bool has_row, divide;
  float r;

  __device__ __forceinline__ float u_of(float w, float c) const {
    const float v = col ? __fmul_rn(w, c) : w;
    if (!has_row) return v;
    return divide ? __fdiv_rn(v, r) : __fmul_rn(v, r);
  }
};

// u for the thread's cached vectors (the column scales are read once, from L1/L2) and the row's
// max / −min of them. Invalid columns get u = 0 and stay out of the max/min.
template <typename TX, int kVec, int kItems>
__device__ __forceinline__ void transform_row(const Pack<TX, kVec> (&xr)[kItems], const LetRow& lr, int c0, int step,
                                              int n, float (&u)[kItems][kVec], float (&mm)[2]) {
  mm[0] = mm[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int c = c0 + j * step;
#pragma unroll
    for (int i = 0; i < kVec; ++i) u[j][i] = 0.0f;
    if (c >= n) continue;
    Pack<float, kVec> cp;
    if (lr.col) cp = load_pack<float, kVec>(lr.col + c);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      u[j][i] = lr.u_of(ld_f32(xr[j].v[i]), lr.col ? cp.v[i] : 1.0f);
      mm[0] = fmaxf(mm[0], u[j][i]);
      mm[1] = fmaxf(mm[1], -u[j][i]);
    }
  }
}

// The row's quantizer state: σ(γ), σ(β) (overlapping the loads in flight), u, and the block-wide
// max / min of u. Every thread of the block must call it (it reduces through `smem`, 2·32 floats).
// own = the thread's own (max, −min) of u before the reduction.
template <typename TX, int kVec, int kItems>
__device__ __forceinline__ GroupState row_state(const Pack<TX, kVec> (&xr)[kItems], const LetRow& lr,
                                                const float* gamma, const float* beta, int64_t r, const TeamPos& tp,
                                                int c0, int step, int n, const Levels& L, float* smem,
                                                float (&u)[kItems][kVec], float (&own)[2]) {
  float a, b;
  lwc_sigmoids(gamma, beta, r, tp, a, b);
  float mm[2];
  transform_row(xr, lr, c0, step, n, u, mm);
  own[0] = mm[0];
  own[1] = mm[1];
  team_reduce<2>(mm, [](float p, float q) { return fmaxf(p, q); }, tp, smem);
  return group_state(mm[0], -mm[1], a, b, L);
}

// kV2: the division by the scale through div_by_scale (fake_quant_common.cuh; same bits), else v1.
template <typename TX, typename TY, int kVec, int kItems, bool kV2>
__global__ void __launch_bounds__(kLetMaxBlock)
    fq_let_forward_kernel(const TX* __restrict__ w, TY* __restrict__ y, const float* __restrict__ col,
                          const float* __restrict__ row, bool divide, const float* __restrict__ gamma,
                          const float* __restrict__ beta, int n, Levels L) {
  __shared__ float smem[32 * 2];
  const TeamPos tp{true, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), blockIdx.x};
  const int64_t r = blockIdx.x;
  const TX* wr = w + r * n;
  const int c0 = threadIdx.x * kVec, step = blockDim.x * kVec;
  Pack<TX, kVec> xr[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j)
    if (c0 + j * step < n) xr[j] = load_pack<TX, kVec>(wr + c0 + j * step);
  const LetRow lr{col, row != nullptr, divide, row ? row[r] : 1.0f};
  float u[kItems][kVec], own[2];
  const GroupState s = row_state(xr, lr, gamma, beta, r, tp, c0, step, n, L, smem, u, own);
  TY* yr = y + r * n;
  if constexpr (kV2) {
    const float rcp = __frcp_rn(s.scale);
    auto body = [&](auto fast_c) {  // the row's elements with one division method
      constexpr bool kFast = decltype(fast_c)::value;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int c = c0 + j * step;
        if (c >= n) continue;
        float o[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = fake_quant_elem<kFast>(u[j][i], s, rcp, L);
        store_pack<TY, kVec>(yr + c, o);
      }
    };
    if (fast_div_ok(s.xmax, s.xmin, rcp)) body(std::true_type{});
    else body(std::false_type{});
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int c = c0 + j * step;
      if (c >= n) continue;
      float o[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = dequantize(quantize(u[j][i], s, L), s);
      store_pack<TY, kVec>(yr + c, o);
    }
  }
}

// Instruction count matters here (per element: the transform, one exact division by the scale,
// the STE bookkeeping, ≈ 60 instructions at ≈ 6 bytes read): u is kept in registers, the STE mask
// as one bit per element, and the gradient-only math uses 1/r (no bit-exactness needed there).
// kV2 (the default) cuts that to ≈ 35 (÷ r rows) / ≈ 25 (others): the quantizer's division by
// div_by_scale, ∂x̂/∂scale and the STE decision by elem_grad, and the max/min tie counts and shares
// only in threads whose own max/min of u is the row's (other threads cannot hold a tie).
template <typename TX, typename TG, int kVec, int kItems, bool kV2>
__global__ void __launch_bounds__(kLetMaxBlock)
    fq_let_backward_kernel(const TG* __restrict__ dy, const TX* __restrict__ w, const float* __restrict__ col,
                           const float* __restrict__ row, bool divide, const float* __restrict__ gamma,
                           const float* __restrict__ beta, float* __restrict__ dgamma, float* __restrict__ dbeta,
                           float* __restrict__ drow, float* __restrict__ dcol_part, int64_t rows, int n, Levels L) {
  static_assert(kItems * kVec <= 32, "the STE mask is one 32-bit word");
  __shared__ float smem[32 * 3];
  const int c0 = threadIdx.x * kVec, step = blockDim.x * kVec;
  float cacc[kItems][kVec];
#pragma unroll
  for (int j = 0; j < kItems; ++j)
#pragma unroll
    for (int i = 0; i < kVec; ++i) cacc[j][i] = 0.0f;
  auto sum = [](float p, float q) { return p + q; };

  // Software pipeline: the next row's w and dy are loaded while this row is worked on, so each
  // block keeps a row's bytes in flight through its barriers and arithmetic.
  Pack<TX, kVec> xr[kItems], xn[kItems];
  Pack<TG, kVec> gr[kItems], gn[kItems];
  auto load_row = [&](int64_t r, Pack<TX, kVec> (&xo)[kItems], Pack<TG, kVec> (&go)[kItems]) {
    if (r >= rows) return;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int c = c0 + j * step;
      if (c < n) {
        xo[j] = load_pack<TX, kVec>(w + r * n + c);
        go[j] = load_pack<TG, kVec>(dy + r * n + c);
      }
    }
  };
  load_row(blockIdx.x, xr, gr);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TeamPos tp{true, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), r};
    load_row(r + gridDim.x, xn, gn);
    const LetRow lr{col, row != nullptr, divide, row ? row[r] : 1.0f};
    float u[kItems][kVec], own[2];
    const GroupState s = row_state(xr, lr, gamma, beta, r, tp, c0, step, n, L, smem, u, own);

    float acc[3] = {0.0f, 0.0f, 0.0f};  // dscale, #(u == xmax), #(u == xmin)
    uint32_t in_mask = 0;               // bit j·kVec + i: the STE passes the element's gradient
    // Whether this thread can hold an element equal to the row's max or min (v2 only counts there).
    const bool has_ext = !kV2 || own[0] == s.xmax || own[1] == -s.xmin;
    if constexpr (kV2) {
      const float rcp = __frcp_rn(s.scale);
      const SteBounds B = ste_bounds(s, L);
      auto body = [&](auto fast_c) {
        constexpr bool kFast = decltype(fast_c)::value;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          if (c0 + j * step >= n) continue;
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            const ElemGrad e = elem_grad<kFast>(u[j][i], s, rcp, B);
            acc[0] = __fmaf_rn(ld_f32(gr[j].v[i]), e.dscale_term, acc[0]);
            in_mask |= e.in ? (1u << (j * kVec + i)) : 0u;
          }
        }
      };
      if (fast_div_ok(s.xmax, s.xmin, rcp)) body(std::true_type{});
      else body(std::false_type{});
      if (has_ext) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          if (c0 + j * step >= n) continue;
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            acc[1] += u[j][i] == s.xmax ? 1.0f : 0.0f;
            acc[2] += u[j][i] == s.xmin ? 1.0f : 0.0f;
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (c0 + j * step >= n) continue;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const ElemQ e = quantize(u[j][i], s, L);
          acc[0] += ld_f32(gr[j].v[i]) * (e.in ? e.t - e.u : e.q - s.zp);
          acc[1] += u[j][i] == s.xmax ? 1.0f : 0.0f;
          acc[2] += u[j][i] == s.xmin ? 1.0f : 0.0f;
          in_mask |= e.in ? (1u << (j * kVec + i)) : 0u;
        }
      }
    }
    team_reduce<3>(acc, sum, tp, smem);

    const GroupGrad gg = group_grad(s, acc[0], L, gamma != nullptr);
    if (gamma && threadIdx.x == 0) {
      dgamma[r] = gg.dgamma;
      dbeta[r] = gg.dbeta;
    }
    const float share_max = gg.dxmax / acc[1], share_min = gg.dxmin / acc[2];
    // ÷ r: du/dr = −u/r, dv = du/r; · r: du/dr = v = u/r, dv = du·r.
    const float rinv = 1.0f / lr.r;
    const float dr_factor = divide ? -rinv : rinv, dv_factor = divide ? rinv : lr.r;
    float dr[1] = {0.0f};
    // du = dy·STE + the max/min shares (only where this thread may hold a tie), then dr and dc.
    auto grads = [&](auto ext_c) {
      constexpr bool kExt = decltype(ext_c)::value;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (c0 + j * step >= n) continue;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          float d = (in_mask >> (j * kVec + i)) & 1u ? ld_f32(gr[j].v[i]) : 0.0f;
          if (kExt) {
            d = __fadd_rn(d, u[j][i] == s.xmax ? share_max : 0.0f);
            d = __fadd_rn(d, u[j][i] == s.xmin ? share_min : 0.0f);
          }
          float dv = d;
          if (lr.has_row) {
            dr[0] += d * u[j][i];
            dv = d * dv_factor;
          }
          cacc[j][i] += dv * ld_f32(xr[j].v[i]);
        }
      }
    };
    if (has_ext) grads(std::true_type{});
    else grads(std::false_type{});
    if (drow) {  // uniform over the launch
      team_reduce<1>(dr, sum, tp, smem);
      if (threadIdx.x == 0) drow[r] = dr[0] * dr_factor;
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      xr[j] = xn[j];
      gr[j] = gn[j];
    }
  }
  if (!dcol_part) return;
  float* part = dcol_part + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int c = c0 + j * step;
    if (c < n) {
      Pack<float, kVec> p;
#pragma unroll
      for (int i = 0; i < kVec; ++i) p.v[i] = cacc[j][i];
      *reinterpret_cast<Pack<float, kVec>*>(part + c) = p;
    }
  }
}

// Threads per block for a row of n elements read kVec at a time, kItems vectors per thread.
int block_for(int64_t n, int vec, int items) {
  const int64_t vecs = (n + vec - 1) / vec;
  const int64_t threads = (vecs + items - 1) / items;
  return static_cast<int>(std::max<int64_t>(32, (threads + 31) / 32 * 32));
}

void check_pointers(std::initializer_list<std::pair<const void*, DType>> ptrs, int64_t pack, const char* op) {
  for (const auto& [p, dt] : ptrs)
    OMNIQ_CHECK(pack_ok(p, dt, pack), "%s: a tensor is not aligned for %lld-element vector access", op,
                static_cast<long long>(pack));
}

// Calls f(Tag<TX>, Tag<TO>, kVec constant) with kVec = 16 bytes of TX.
template <typename F>
void dispatch_let(DType xdt, DType odt, const char* op, F&& f) {
  dispatch_float(xdt, op, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_float(odt, op, [&](auto ot) { f(xt, ot, std::integral_constant<int, static_cast<int>(16 / sizeof(TX))>{}); });
  });
}

}  // namespace

void fake_quant_let_forward(const Tensor& w, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                            const LetScales& let, Tensor& y) {
  const char* op = "fake_quant_let_forward";
  const int64_t rows = w.size(0), n = w.size(1);
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(w.dtype()));
  check_pointers({{w.data(), w.dtype()}, {y.data(), y.dtype()}, {let.col ? let.col->data() : nullptr, DType::f32}},
                 pack, op);
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(w.device());
  const float* col = let.col ? let.col->data_as<const float>() : nullptr;
  const float* row = let.row ? let.row->data_as<const float>() : nullptr;
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  dispatch_let(w.dtype(), y.dtype(), op, [&](auto xt, auto yt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TY = typename decltype(yt)::type;
    constexpr int kVec = decltype(vec_c)::value, kItems = 32 / kVec;
    const int block = block_for(n, kVec, kItems);
    OMNIQ_CHECK(block <= kLetMaxBlock, "%s: rows of %lld elements are too long", op, static_cast<long long>(n));
    auto kernel = fq_v1_requested() ? fq_let_forward_kernel<TX, TY, kVec, kItems, false>
                                    : fq_let_forward_kernel<TX, TY, kVec, kItems, true>;
    kernel<<<static_cast<unsigned>(rows), block, 0, ctx.stream>>>(w.data_as<const TX>(), y.data_as<TY>(), col, row,
                                                                  let.row_divide, gp, bp, static_cast<int>(n), L);
    CUDA_CHECK_LAUNCH();
  });
}

void fake_quant_let_backward(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                             const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g) {
  const char* op = "fake_quant_let_backward";
  const int64_t rows = w.size(0), n = w.size(1);
  const int64_t pack = static_cast<int64_t>(16 / dtype_size(w.dtype()));
  check_pointers({{w.data(), w.dtype()}, {dy.data(), dy.dtype()}, {let.col ? let.col->data() : nullptr, DType::f32}},
                 pack, op);
  if (!fq_v1_requested() && !let_bwd_old_requested() && fake_quant_let_backward_tiled(dy, w, p, gamma, beta, let, g))
    return;
  const Levels L = make_levels(p);
  CudaContext& ctx = cuda_context(w.device());
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, w.device().index));
  const float* col = let.col ? let.col->data_as<const float>() : nullptr;
  const float* row = let.row ? let.row->data_as<const float>() : nullptr;
  const float* gp = gamma ? gamma->data_as<const float>() : nullptr;
  const float* bp = beta ? beta->data_as<const float>() : nullptr;
  float* dgp = gamma ? g.dgamma.data_as<float>() : nullptr;
  float* dbp = beta ? g.dbeta.data_as<float>() : nullptr;
  float* drp = let.row ? g.drow.data_as<float>() : nullptr;
  Tensor part;
  dispatch_let(w.dtype(), dy.dtype(), op, [&](auto xt, auto gt, auto vec_c) {
    using TX = typename decltype(xt)::type;
    using TG = typename decltype(gt)::type;
    constexpr int kVec = decltype(vec_c)::value;
    // 16 elements a thread where the row allows (≤ 4096: half the registers, twice the warps per SM
    // to hide latency with), else 32.
    auto launch = [&](auto items_c) {
      constexpr int kItems = decltype(items_c)::value;
      const int block = block_for(n, kVec, kItems);
      OMNIQ_CHECK(block <= kLetMaxBlock, "%s: rows of %lld elements are too long", op, static_cast<long long>(n));
      auto kernel = fq_v1_requested() ? fq_let_backward_kernel<TX, TG, kVec, kItems, false>
                                      : fq_let_backward_kernel<TX, TG, kVec, kItems, true>;
      // As many blocks as fit on the GPU at once, each walking rows; no more, so that the column
      // partials ([grid, n] f32) stay small next to the weight.
      int per_sm = 0;
      CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
      const int64_t grid = std::min<int64_t>(rows, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
      part = let.col ? Tensor::empty({grid, n}, DType::f32, w.device()) : Tensor();
      kernel<<<static_cast<unsigned>(grid), block, 0, ctx.stream>>>(
          dy.data_as<const TG>(), w.data_as<const TX>(), col, row, let.row_divide, gp, bp, dgp, dbp, drp,
          let.col ? part.data_as<float>() : nullptr, rows, static_cast<int>(n), L);
      CUDA_CHECK_LAUNCH();
    };
    static const bool wide = std::getenv("OMNIQ_LET_WIDE") != nullptr;  // A/B switch for measurements
    if (n <= 16 * kLetMaxBlock && !wide) launch(std::integral_constant<int, 16 / kVec>{});
    else launch(std::integral_constant<int, 32 / kVec>{});
  });
  if (let.col) g.dcol = col_sum(part);  // fixed-order sum of the per-block partials
}

}  // namespace omniq::cuda
