// The v2 fake-quant kernels (the default; OMNIQ_FQ_V1=1 selects v1) against the CPU reference and
// against v1 on the same GPU. v2 replaces the per-element IEEE division u = x / scale by a reciprocal
// and two FMA corrections that return the same bits (ops/cuda/fake_quant_common.cuh, div_by_scale),
// falling back to the division for groups where that is not proven (|x/scale| > 2^100), and derives
// the STE decision and ∂x̂/∂scale from one clamp. So:
//   ŵ: bit-identical to the CPU and to v1, every dtype (also at the awkward quotients: x placed on
//      and 1–3 ulps around (k + ½)·scale, where a 1-ulp error in u flips round(u); tiny and huge
//      values that exercise the fallback and the subnormal residuals);
//   dγ, dβ, dw: the existing tolerances vs the CPU (|Δ| ≤ 3e-5·max|ref| + 1e-4·|ref| for dγ/dβ;
//      dw f32 1e-5·max|ref| + 1e-5·|ref|, 16-bit one rounding step, rtol 8e-3), the same tolerance
//      vs v1 (only the fp32 summation order of dscale differs), and bitwise repeatable;
//   LET-fused op: ŵ bitwise vs v1, gradients to 2e-5·max|ref| + 1e-3·|ref| vs v1.
// The backward without dx of 16-bit weights runs the streaming kernel (fake_quant.cu): checked against
// the CPU and v1 (tolerance), the dx kernel and the first v2 kernel (OMNIQ_FQ_V2_OLD=1; bitwise: the
// same thread mapping), bitwise repeatable and bitwise independent of OMNIQ_FQ_STAGES.
// Shapes: LLaMA-2 7B/13B/70B row widths 4096, 5120, 11008, 13824, 28672, g128 and per-channel.
// Skipped without a GPU.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")  // the host oracle's fp32 scale must round like the op
#endif

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "ops/fake_quant.h"
#include "ops/fake_quant_let.h"
#include "tests/fake_quant_let_test_util.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

const Device kGpu = Device::cuda(0);

// Runs the CUDA kernels of v1 while alive (the launchers read OMNIQ_FQ_V1 at every launch).
struct UseV1 {
  UseV1() { setenv("OMNIQ_FQ_V1", "1", 1); }
  ~UseV1() { unsetenv("OMNIQ_FQ_V1"); }
};

// Sets an A/B switch of the launchers while alive (OMNIQ_FQ_V2_OLD, OMNIQ_FQ_STAGES).
struct ScopedEnv {
  const char* key;
  ScopedEnv(const char* k, const char* v) : key(k) { setenv(k, v, 1); }
  ~ScopedEnv() { unsetenv(key); }
};

std::vector<float> host(const Tensor& t) { return t.to(Device::cpu()).to_f32_vector(); }

::testing::AssertionResult close_to(const Tensor& got, const Tensor& ref, float atol_rel, float rtol) {
  const std::vector<float> r = host(ref);
  return all_close(host(got), r, atol_rel * max_abs(r), rtol);
}

struct Case {
  int64_t out, in;
  int bits, group;  // group 0: per-channel
  bool symmetric;
};

std::string name(const Case& c, DType w, DType o) {
  return "[" + std::to_string(c.out) + "x" + std::to_string(c.in) + "] W" + std::to_string(c.bits) +
         (c.group ? " g" + std::to_string(c.group) : " per-channel") + (c.symmetric ? " sym" : "") + " w " +
         dtype_name(w) + " -> " + dtype_name(o);
}

// LWC parameters: γ, β in [-1, 5] (σ 0.27..0.993), so the range is clipped and elements fall
// outside the levels (the STE's clamp branch).
struct Lwc {
  Tensor gamma, beta;
};
Lwc make_lwc(int64_t groups, uint64_t seed) {
  return {Tensor::uniform({groups}, -1.0f, 5.0f, seed), Tensor::uniform({groups}, -1.0f, 5.0f, seed + 1)};
}

// Forward (bit-exact vs CPU and v1) and backward with dw (vs CPU and v1 within tolerance, v2 bitwise
// repeatable) of one weight; w holds the test values in dtype wdt, ŵ is written in odt and dy has
// dtype gdt.
void check_weight(const Case& c, const std::vector<float>& wv, DType wdt, DType odt, DType gdt, uint64_t seed,
                  bool with_cpu = true) {
  SCOPED_TRACE(name(c, wdt, odt) + " dy " + dtype_name(gdt));
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  const int64_t groups = spec.num_groups(c.out, c.in);
  Tensor w = Tensor::from_f32(wv, {c.out, c.in}, wdt);
  Tensor dy = Tensor::uniform({c.out, c.in}, -1.0f, 1.0f, seed, gdt);
  Lwc p = make_lwc(groups, seed + 7);
  Tensor w_d = w.to(kGpu), dy_d = dy.to(kGpu), g_d = p.gamma.to(kGpu), b_d = p.beta.to(kGpu);

  Tensor y2 = fake_quant_weight_forward(w_d, spec, &g_d, &b_d, odt);
  FakeQuantWeightGrads d2 = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, true);
  FakeQuantWeightGrads d2n = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, false);  // no dx: own kernel
  FakeQuantWeightGrads d2r = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, false);
  FakeQuantWeightGrads d2o, d2s3;  // the first v2 kernel without dx; the stream with 3 stages
  {
    ScopedEnv old("OMNIQ_FQ_V2_OLD", "1");
    d2o = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, false);
  }
  {
    ScopedEnv stages("OMNIQ_FQ_STAGES", "3");
    d2s3 = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, false);
  }
  Tensor y1;
  FakeQuantWeightGrads d1;
  {
    UseV1 v1;
    y1 = fake_quant_weight_forward(w_d, spec, &g_d, &b_d, odt);
    d1 = fake_quant_weight_backward(dy_d, w_d, spec, &g_d, &b_d, true);
  }
  EXPECT_TRUE(bit_equal(host(y2), host(y1))) << "forward v2 vs v1";
  const float dw_rtol = wdt == DType::f32 ? 1e-5f : 8e-3f;
  EXPECT_TRUE(close_to(d2.dw, d1.dw, 1e-5f, dw_rtol)) << "dw v2 vs v1";
  EXPECT_TRUE(close_to(d2.dgamma, d1.dgamma, 3e-5f, 1e-4f)) << "dgamma v2 vs v1";
  EXPECT_TRUE(close_to(d2.dbeta, d1.dbeta, 3e-5f, 1e-4f)) << "dbeta v2 vs v1";
  // Every dw-less kernel (the streaming default, the first v2 one) sums dscale with the dw kernel's
  // thread mapping and order: the same bits, every run, whatever the stage count.
  EXPECT_TRUE(bit_equal(host(d2n.dgamma), host(d2.dgamma))) << "dgamma without dw";
  EXPECT_TRUE(bit_equal(host(d2n.dbeta), host(d2.dbeta))) << "dbeta without dw";
  EXPECT_TRUE(bit_equal(host(d2o.dgamma), host(d2.dgamma))) << "dgamma first v2 without dw";
  EXPECT_TRUE(bit_equal(host(d2o.dbeta), host(d2.dbeta))) << "dbeta first v2 without dw";
  EXPECT_TRUE(close_to(d2n.dgamma, d1.dgamma, 3e-5f, 1e-4f)) << "dgamma stream vs v1";
  EXPECT_TRUE(close_to(d2n.dbeta, d1.dbeta, 3e-5f, 1e-4f)) << "dbeta stream vs v1";
  EXPECT_TRUE(bit_equal(host(d2r.dgamma), host(d2n.dgamma))) << "dgamma repeat";
  EXPECT_TRUE(bit_equal(host(d2r.dbeta), host(d2n.dbeta))) << "dbeta repeat";
  EXPECT_TRUE(bit_equal(host(d2s3.dgamma), host(d2n.dgamma))) << "dgamma 3 stages";
  EXPECT_TRUE(bit_equal(host(d2s3.dbeta), host(d2n.dbeta))) << "dbeta 3 stages";
  if (!with_cpu) return;
  Tensor y_ref = fake_quant_weight_forward(w, spec, &p.gamma, &p.beta, odt);
  EXPECT_TRUE(bit_equal(host(y2), host(y_ref))) << "forward v2 vs CPU";
  FakeQuantWeightGrads r = fake_quant_weight_backward(dy, w, spec, &p.gamma, &p.beta, true);
  EXPECT_TRUE(close_to(d2.dw, r.dw, 1e-5f, dw_rtol)) << "dw v2 vs CPU";
  EXPECT_TRUE(close_to(d2.dgamma, r.dgamma, 3e-5f, 1e-4f)) << "dgamma v2 vs CPU";
  EXPECT_TRUE(close_to(d2.dbeta, r.dbeta, 3e-5f, 1e-4f)) << "dbeta v2 vs CPU";
  EXPECT_TRUE(close_to(d2n.dgamma, r.dgamma, 3e-5f, 1e-4f)) << "dgamma stream vs CPU";
  EXPECT_TRUE(close_to(d2n.dbeta, r.dbeta, 3e-5f, 1e-4f)) << "dbeta stream vs CPU";
}

// Weights whose quotients x/scale sit on and next to the rounding boundaries k + ½: per group the
// max M and min m are placed first, the group's fp32 scale computed exactly as the op does
// (ref_forward: the same fp32 operations), and every other element set to RN((k + ½)·scale) moved
// by −3..3 ulps, kept strictly inside (m, M) so the scale does not change.
std::vector<float> near_tie_weights(const Case& c, const Tensor& gamma, const Tensor& beta, uint64_t seed) {
  const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
  const int64_t n = spec.group_len(c.in), groups = spec.num_groups(c.out, c.in);
  std::vector<float> v = Tensor::uniform({groups * n}, -1.0f, 1.0f, seed).to_f32_vector();
  const std::vector<float> gv = gamma.to_f32_vector(), bv = beta.to_f32_vector();
  for (int64_t k = 0; k < groups; ++k) {
    float* x = &v[k * n];
    const float M = 0.5f + std::fabs(x[0]), m = -0.25f - std::fabs(x[1]);  // asymmetric range
    std::vector<float> probe(n, 0.0f);
    probe[0] = M, probe[1] = m;
    const std::vector<float> g1{gv[k]}, b1{bv[k]};
    const float s = ref_forward(probe, {n, c.bits, c.symmetric}, &g1, &b1).scale[0];
    x[0] = M, x[1] = m;
    for (int64_t i = 2; i < n; ++i) {
      // k + ½ over the quotients of (m, M), spread over the range, then −3..3 ulps around it.
      const double lo = std::ceil(m / s - 0.5), hi = std::floor(M / s - 0.5);
      const double kk = lo + std::floor((hi - lo + 1) * (0.5 + 0.5 * x[i]));
      float e = static_cast<float>((std::min(kk, hi) + 0.5) * s);
      const int ulps = static_cast<int>(i % 7) - 3;
      for (int u = 0; u < std::abs(ulps); ++u) e = std::nextafter(e, ulps > 0 ? INFINITY : -INFINITY);
      x[i] = std::min(std::max(e, std::nextafter(m, INFINITY)), std::nextafter(M, -INFINITY));
    }
  }
  return v;
}

}  // namespace

TEST(FakeQuantV2Cuda, NearTieQuotientsBitExactF32) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 10;
  for (int bits : {2, 3, 4, 8})
    for (int group : {128, 0})
      for (bool sym : {false, true}) {
        const Case c{96, 4096, bits, group, sym};
        const WeightQuantSpec spec{bits, group, sym};
        const int64_t groups = spec.num_groups(c.out, c.in);
        Lwc p = make_lwc(groups, seed + 7);  // the same γ/β check_weight draws from seed + 7
        const std::vector<float> w = near_tie_weights(c, p.gamma, p.beta, seed + 100);
        check_weight(c, w, DType::f32, DType::f32, DType::f32, seed);
        seed += 20;
      }
}

// Every storage dtype of w, ŵ and dy, at the production row widths (7B 4096/11008, 13B 5120/13824,
// 70B 28672), g128 and per-channel, random data with the planted awkward groups (constant, one
// sign, ties, zeros).
TEST(FakeQuantV2Cuda, ProductionWidthsAllDtypesMatchCpuAndV1) {
  OMNIQ_REQUIRE_CUDA();
  const DType kFloats[] = {DType::f32, DType::bf16, DType::f16};
  uint64_t seed = 1000;
  for (int64_t in : {4096, 5120, 11008, 13824, 28672})
    for (int group : {128, 0})
      for (DType wdt : kFloats) {
        const Case c{in > 11008 ? 12 : 40, in, 4, group, false};
        const int64_t n = group ? group : in, groups = c.out * in / n;
        const std::vector<float> w = make_groups(groups, n, seed);
        // ŵ and dy: the training step's bf16, and one other dtype in turn.
        check_weight(c, w, wdt, DType::bf16, DType::bf16, seed);
        check_weight(c, w, wdt, wdt == DType::f32 ? DType::f16 : DType::f32, wdt, seed + 1);
        seed += 10;
      }
}

// The full LLaMA-7B weight shapes in the training step's dtypes (f16 w, bf16 ŵ and dy), against v1
// only (the CPU reference of all of it would take minutes): W4 g128, W3 sym per-channel.
TEST(FakeQuantV2Cuda, FullSizeWeightsMatchV1) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  uint64_t seed = 3000;
  for (const auto& s : shapes)
    for (int group : {128, 0}) {
      const Case c{s[0], s[1], group ? 4 : 3, group, group == 0};
      const int64_t n = group ? group : s[1];
      const std::vector<float> w = make_groups(s[0] * s[1] / n, n, seed);
      check_weight(c, w, DType::f16, DType::bf16, DType::bf16, seed, /*with_cpu=*/false);
      seed += 10;
    }
}

// Odd shapes: group lengths that are not a multiple of the 16-byte vector (scalar kernels), short
// groups (teams of 4..32 lanes and a partial last block), very long rows (re-read excess), and
// grid-stride loops of several tiles per block with a part-filled last tile.
TEST(FakeQuantV2Cuda, OddShapesMatchCpuAndV1) {
  OMNIQ_REQUIRE_CUDA();
  const Case cases[] = {{7, 96, 4, 32, false},  {5, 100, 3, 0, false},  {3, 1000, 2, 0, true},
                        {9, 264, 4, 0, false},  {33, 136, 8, 0, false}, {3, 40000, 4, 0, false},
                        {2, 50000, 4, 0, true}, {70, 64, 4, 64, true},  {1, 8, 4, 0, false},
                        // more tiles than the streaming backward's persistent grid holds, the last
                        // tile part-filled (g128: 64 groups a tile), and many rows of 640 vectors
                        {30001, 128, 4, 128, false}, {1500, 5120, 3, 0, true}};
  uint64_t seed = 5000;
  for (const Case& c : cases)
    for (DType wdt : {DType::f32, DType::bf16, DType::f16}) {
      const int64_t n = c.group ? c.group : c.in;
      check_weight(c, make_groups(c.out * c.in / n, n, seed), wdt, DType::bf16, DType::f32, seed);
      seed += 10;
    }
}

// Values at the edges of the fast division's preconditions: groups of tiny values (the residual
// x − s·q is subnormal: round(u) = ±0 either way), huge values with a scale clamped at 1e-5 by a
// tiny σ(γ) (|x/scale| > 2^100: the group falls back to __fdiv_rn; x/scale may overflow to ∞), and
// subnormal weights. f32 (the only dtype with these ranges besides bf16).
TEST(FakeQuantV2Cuda, TinyAndHugeValuesFallBackExactly) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t n = 128, groups = 24;
  std::vector<float> w = Tensor::uniform({groups * n}, -1.0f, 1.0f, 41).to_f32_vector();
  for (int64_t k = 0; k < groups; ++k) {
    float* x = &w[k * n];
    const float mag = k % 4 == 0 ? 1e-36f : k % 4 == 1 ? 1e-42f : k % 4 == 2 ? 1e30f : 3e38f;
    for (int64_t i = 0; i < n; ++i) x[i] *= mag;
    if (k % 8 == 1) x[5] = 1.0f;  // a normal max among subnormals
  }
  for (bool sym : {false, true}) {
    const WeightQuantSpec spec{4, 0, sym};
    Tensor wt = Tensor::from_f32(w, {groups, n}, DType::f32);
    // γ very negative on odd groups: σ(γ) tiny, the scale clamps at 1e-5 and |x/scale| explodes.
    std::vector<float> gv(groups), bv(groups);
    for (int64_t k = 0; k < groups; ++k) gv[k] = bv[k] = k % 2 ? -90.0f : 3.0f;
    Tensor g = Tensor::from_f32(gv, {groups}), b = Tensor::from_f32(bv, {groups});
    Tensor w_d = wt.to(kGpu), g_d = g.to(kGpu), b_d = b.to(kGpu);
    Tensor y = fake_quant_weight_forward(w_d, spec, &g_d, &b_d);
    Tensor y_ref = fake_quant_weight_forward(wt, spec, &g, &b);
    EXPECT_TRUE(bit_equal(host(y), host(y_ref))) << (sym ? "sym" : "asym");
    Tensor y1;
    {
      UseV1 v1;
      y1 = fake_quant_weight_forward(w_d, spec, &g_d, &b_d);
    }
    EXPECT_TRUE(bit_equal(host(y), host(y1))) << "v2 vs v1 " << (sym ? "sym" : "asym");
  }
}

// The activation quantizer runs the same kernels (per-token rows, no LWC): v2 vs CPU bitwise.
TEST(FakeQuantV2Cuda, ActivationMatchesCpuAndV1) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 7000;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int64_t C : {128, 4096, 11008}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " C " + std::to_string(C));
      Tensor x = Tensor::from_f32(make_groups(24, C, seed), {24, C}, dt);
      Tensor dy = Tensor::uniform({24, C}, -1.0f, 1.0f, seed + 1, dt);
      Tensor x_d = x.to(kGpu), dy_d = dy.to(kGpu);
      Tensor y2 = fake_quant_act_forward(x_d, 4);
      Tensor dx2 = fake_quant_act_backward(dy_d, x_d, 4);
      EXPECT_TRUE(bit_equal(host(y2), host(fake_quant_act_forward(x, 4))));
      const float rtol = dt == DType::f32 ? 1e-5f : 8e-3f;
      EXPECT_TRUE(close_to(dx2, fake_quant_act_backward(dy, x, 4), 1e-5f, rtol));
      UseV1 v1;
      EXPECT_TRUE(bit_equal(host(y2), host(fake_quant_act_forward(x_d, 4))));
      EXPECT_TRUE(close_to(dx2, fake_quant_act_backward(dy_d, x_d, 4), 1e-5f, rtol));
      seed += 10;
    }
}

// LET-fused op: v2 vs v1 on the same GPU (the CPU comparison is test_fake_quant_let_cuda, which runs
// v2 by default): ŵ bitwise, gradients within the summation-order tolerance, v2 bitwise repeatable.
TEST(FakeQuantV2Cuda, LetFusedMatchesV1) {
  OMNIQ_REQUIRE_CUDA();
  int k = 0;
  for (int64_t cols : {4096, 5120, 8192, 136})
    for (RowMode rm : {RowMode::divide, RowMode::multiply, RowMode::none})
      for (DType out : {DType::bf16, DType::f32}) {
        LetCase c{cols == 4096 ? 700 : 64, cols};
        c.w_dtype = cols == 136 ? DType::bf16 : DType::f16, c.out_dtype = out, c.row = rm;
        c.symmetric = k % 3 == 2, c.bits = c.symmetric ? 3 : 4;
        SCOPED_TRACE("LET case " + std::to_string(k++) + " cols " + std::to_string(cols));
        const LetData d = make_let_data(c, 90 + k);
        const LetOutputs a = run_let(c, d, kGpu, true), a2 = run_let(c, d, kGpu, true);
        LetOutputs b;
        {
          UseV1 v1;
          b = run_let(c, d, kGpu, true);
        }
        EXPECT_TRUE(bit_equal(host(a.y), host(b.y))) << "ŵ v2 vs v1";
        auto grads = [&](const Tensor& x, const Tensor& ref, const Tensor& again, const char* what) {
          ASSERT_EQ(x.defined(), ref.defined()) << what;
          if (!ref.defined()) return;
          EXPECT_TRUE(close_to(x, ref, 2e-5f, 1e-3f)) << what;
          EXPECT_TRUE(bit_equal(host(x), host(again))) << what << " repeat";
        };
        grads(a.dgamma, b.dgamma, a2.dgamma, "dgamma");
        grads(a.dbeta, b.dbeta, a2.dbeta, "dbeta");
        grads(a.dcol, b.dcol, a2.dcol, "dcol");
        grads(a.drow, b.drow, a2.drow, "drow");
      }
}
