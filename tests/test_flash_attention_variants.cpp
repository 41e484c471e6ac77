// The two flash attention backward kernels (ops/cuda/flash_attention.h: variant 2, the default,
// 128-key CTAs of 8 warps; variant 1, the previous 64-key CTAs of 4 warps), and likewise the two
// forward kernels (128- vs 64-query CTAs; ForwardVariants* below), on the shapes where they
// differ: T around the 128-key tile (64, 127, 128, 129, 191, 192, 193, 255, 320), where variant 2's
// causal query range (from tile 2·kt), its diagonal "last contributor" (kt = mt/2), its masked
// warps (keys after a query tile, or past the end) and its padding queries are exercised; every
// kv split; both modes. Each case is checked against the CPU reference (CUDA forward's out/lse fed
// to both, as in test_flash_attention.cpp) and v1 against v2 (same math, fp32 summation order
// only). Deterministic mode must repeat bit for bit in variant 2 (it fuses the dQ conversion into
// the last key tile, so a wrong ordering would show up here as run-to-run differences).
//
// Tolerances: bf16 rtol 3e-2, f16 1e-2, atol rtol·max|ref| (as test_flash_attention.cpp);
// v1 vs v2 rtol 1e-2, atol 1e-2·max|v1| (both round P and dS to 16 bits the same way; they differ
// in fp32 summation order and in v2's fmaf for the exponent).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops/attention.h"
#include "runtime/error.h"
#include "tests/flash_attention_test_util.h"
#include "tests/support/test_support.h"
#ifdef OMNIQ_HAS_CUDA
#include "ops/cuda/flash_attention.h"
#include "ops/cuda/flash_attention_backward_v3.h"
#endif

namespace omniq {
namespace {

#ifdef OMNIQ_HAS_CUDA
using test::all_close;
// Shared with test_flash_attention.cpp (tests/flash_attention_test_util.h).
using fa_test::close_scaled;
using fa_test::delta_of;
using fa_test::same_bits;

struct VCase {
  int64_t B, T, Hq, Hkv, D;
  bool causal;
  DType dt;
};

std::ostream& operator<<(std::ostream& os, const VCase& c) {
  return os << dtype_name(c.dt) << " B=" << c.B << " T=" << c.T << " Hq=" << c.Hq << " Hkv=" << c.Hkv
            << " D=" << c.D << (c.causal ? " causal" : " full");
}

// Random inputs of case c on the GPU (dO from seed s, q/k/v from s + 1 .. s + 3), the forward's lse
// and δ: what the backward comparisons feed every variant.
struct BwdInputs {
  Tensor q, k, v, dout, lse, delta;
};
BwdInputs bwd_inputs(const VCase& c, uint64_t s, float scale, bool causal, const Device& gpu) {
  BwdInputs in;
  const Tensor doh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, s, c.dt);
  in.q = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, s + 1, c.dt).to(gpu);
  in.k = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, s + 2, c.dt).to(gpu);
  in.v = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, s + 3, c.dt).to(gpu);
  in.dout = doh.to(gpu);
  const Tensor out = attention_forward(in.q, in.k, in.v, scale, causal, &in.lse);
  in.delta = delta_of(out.to(Device::cpu()), doh, c);
  return in;
}

// Variant switch: explicit set wins, round trip, bad values rejected (no GPU needed).
TEST(FlashAttentionDispatch, BackwardVariantSwitch) {
  const int saved = cuda::flash_backward_variant();
  EXPECT_TRUE(saved >= 1 && saved <= 3);
  cuda::set_flash_backward_variant(1);
  EXPECT_EQ(cuda::flash_backward_variant(), 1);
  cuda::set_flash_backward_variant(3);
  EXPECT_EQ(cuda::flash_backward_variant(), 3);
  cuda::set_flash_backward_variant(2);
  EXPECT_EQ(cuda::flash_backward_variant(), 2);
  EXPECT_THROW(cuda::set_flash_backward_variant(4), Error);
  EXPECT_EQ(cuda::flash_backward_variant(), 2);
  cuda::set_flash_backward_variant(saved);
}

// Variant 2's automatic splits: the fewest giving >= 3 CTAs (of 128 keys) per SM, else all G.
TEST(FlashAttentionDispatch, KvSplitsV2) {
  EXPECT_EQ(cuda::flash_attention_kv_splits_v2(1, 2048, 32, 32, 132), 1);  // MHA: nothing to split
  EXPECT_EQ(cuda::flash_attention_kv_splits_v2(1, 2048, 64, 8, 132), 4);   // 70B: 128 CTAs -> 512
  EXPECT_EQ(cuda::flash_attention_kv_splits_v2(4, 2048, 64, 8, 132), 1);   // 512 CTAs already
  EXPECT_EQ(cuda::flash_attention_kv_splits_v2(1, 100, 8, 2, 132), 4);     // never enough: G
  EXPECT_EQ(cuda::flash_attention_kv_splits_v2(1, 2048, 12, 4, 16), 1);
}

// Every T around the 128-key tile, causal and full, GQA with splits 1/2/4 and the automatic
// choice, both modes: v2 vs the CPU, v1 vs v2, and v2's deterministic mode twice, bit for bit.
// v3 against the CPU and v2, and bitwise on a deterministic rerun (BackwardVariantsAroundKeyTile).
void check_v3(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& delta,
              const Tensor& lse, float scale, bool causal, int splits, bool det, const AttentionGrads& want,
              const AttentionGrads& g2, float rel) {
  const AttentionGrads g3 = cuda::flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, causal, splits, det);
  ASSERT_EQ(g3.dq.shape(), q.shape());
  ASSERT_EQ(g3.dk.shape(), k.shape());
  EXPECT_TRUE(close_scaled(g3.dq, want.dq, rel)) << "v3 dq";
  EXPECT_TRUE(close_scaled(g3.dk, want.dk, rel)) << "v3 dk";
  EXPECT_TRUE(close_scaled(g3.dv, want.dv, rel)) << "v3 dv";
  EXPECT_TRUE(close_scaled(g3.dq, g2.dq, 1e-2f)) << "v3 vs v2 dq";
  EXPECT_TRUE(close_scaled(g3.dk, g2.dk, 1e-2f)) << "v3 vs v2 dk";
  EXPECT_TRUE(close_scaled(g3.dv, g2.dv, 1e-2f)) << "v3 vs v2 dv";
  if (det) {
    const AttentionGrads again = cuda::flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, causal, splits, det);
    EXPECT_TRUE(same_bits(again.dq, g3.dq)) << "v3 deterministic dq differs on a rerun";
    EXPECT_TRUE(same_bits(again.dk, g3.dk)) << "v3 deterministic dk differs on a rerun";
    EXPECT_TRUE(same_bits(again.dv, g3.dv)) << "v3 deterministic dv differs on a rerun";
  }
}

TEST(FlashAttentionCuda, BackwardVariantsAroundKeyTile) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  uint64_t seed = 12000;
  int n = 0, v3_cases = 0;
  for (int64_t T : {64, 127, 128, 129, 191, 192, 193, 255, 320})
    for (bool causal : {true, false}) {
      ++n;
      const VCase c{2, T, 8, 2, n % 2 ? 128 : 64, causal, n % 3 ? DType::bf16 : DType::f16};
      const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
      const Tensor qh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed += 10, c.dt);
      const Tensor kh = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 1, c.dt);
      const Tensor vh = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 2, c.dt);
      const Tensor doh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed + 3, c.dt);
      const Tensor q = qh.to(gpu), k = kh.to(gpu), v = vh.to(gpu), dout = doh.to(gpu);
      Tensor lse;
      const Tensor out = attention_forward(q, k, v, scale, causal, &lse);
      const Tensor out_h = out.to(Device::cpu());
      const Tensor delta = delta_of(out_h, doh, c);
      const AttentionGrads want = attention_backward(doh, qh, kh, vh, out_h, lse.to(Device::cpu()), scale, causal);
      const float rel = c.dt == DType::bf16 ? 3e-2f : 1e-2f;
      for (int splits : {0, 1, 2, 4})
        for (bool det : {true, false}) {
          SCOPED_TRACE(testing::Message() << c << " splits=" << splits << (det ? " deterministic" : " atomic"));
          const AttentionGrads g2 =
              cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, splits, det);
          const AttentionGrads g1 =
              cuda::flash_attention_backward_v1(dout, q, k, v, delta, lse, scale, causal, splits, det);
          ASSERT_EQ(g2.dq.shape(), qh.shape());
          ASSERT_EQ(g2.dk.shape(), kh.shape());
          ASSERT_EQ(g2.dv.dtype(), c.dt);
          EXPECT_TRUE(close_scaled(g2.dq, want.dq, rel)) << "v2 dq";
          EXPECT_TRUE(close_scaled(g2.dk, want.dk, rel)) << "v2 dk";
          EXPECT_TRUE(close_scaled(g2.dv, want.dv, rel)) << "v2 dv";
          EXPECT_TRUE(close_scaled(g2.dq, g1.dq, 1e-2f)) << "v2 vs v1 dq";
          EXPECT_TRUE(close_scaled(g2.dk, g1.dk, 1e-2f)) << "v2 vs v1 dk";
          EXPECT_TRUE(close_scaled(g2.dv, g1.dv, 1e-2f)) << "v2 vs v1 dv";
          if (det) {
            const AttentionGrads again =
                cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, splits, det);
            EXPECT_TRUE(same_bits(again.dq, g2.dq)) << "v2 deterministic dq differs on a rerun";
            EXPECT_TRUE(same_bits(again.dk, g2.dk)) << "v2 deterministic dk differs on a rerun";
            EXPECT_TRUE(same_bits(again.dv, g2.dv)) << "v2 deterministic dv differs on a rerun";
          }
          if (cuda::flash_backward_v3_available(q)) {  // wgmma: D = 128, sm_90 GPU, sm_90a build
            ++v3_cases;
            check_v3(dout, q, k, v, delta, lse, scale, causal, splits, det, want, g2, rel);
          }
        }
    }
  if (cuda::flash_backward_v3_available(Tensor::empty(Shape{1, 1, 1, 128}, DType::bf16, gpu)))
    EXPECT_GT(v3_cases, 0);
}

// v3 (wgmma) at the long shapes of a real step (T = 1000 and 2048, MHA and GQA with splits): against
// v2 (same products, different fp32 summation inside the MMAs: rtol 1e-2) in both modes, and bitwise
// reproducible in the deterministic mode.
TEST(FlashAttentionCuda, BackwardV3LongSequences) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  if (!cuda::flash_backward_v3_available(Tensor::empty(Shape{1, 1, 1, 128}, DType::bf16, gpu)))
    GTEST_SKIP() << "no wgmma kernel on this GPU / build";
  uint64_t seed = 16000;
  for (int64_t T : {1000, 2048})
    for (int64_t Hkv : {4, 2}) {
      const VCase c{1, T, 4, Hkv, 128, true, DType::bf16};
      const float scale = 1.f / std::sqrt(128.f);
      const BwdInputs in = bwd_inputs(c, seed += 10, scale, true, gpu);
      const auto& [q, k, v, dout, lse, delta] = in;
      for (bool det : {true, false}) {
        SCOPED_TRACE(testing::Message() << c << (det ? " deterministic" : " atomic"));
        const AttentionGrads g2 = cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, true, 0, det);
        const AttentionGrads g3 = cuda::flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, true, 0, det);
        EXPECT_TRUE(close_scaled(g3.dq, g2.dq, 1e-2f)) << "v3 vs v2 dq";
        EXPECT_TRUE(close_scaled(g3.dk, g2.dk, 1e-2f)) << "v3 vs v2 dk";
        EXPECT_TRUE(close_scaled(g3.dv, g2.dv, 1e-2f)) << "v3 vs v2 dv";
        if (det) {
          const AttentionGrads again = cuda::flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, true, 0, det);
          EXPECT_TRUE(same_bits(again.dq, g3.dq)) << "v3 deterministic dq differs on a rerun";
          EXPECT_TRUE(same_bits(again.dk, g3.dk)) << "v3 deterministic dk differs on a rerun";
          EXPECT_TRUE(same_bits(again.dv, g3.dv)) << "v3 deterministic dv differs on a rerun";
        }
      }
    }
}

// Forward kernels: v2 (128-query CTAs, 32 rows per warp) and v1 against the CPU (out rtol 2e-2,
// atol 2e-2·max|ref|; lse atol 2e-3, rtol 1e-3, as test_flash_attention.cpp) and against each other
// (same products in the same order; only FMA contraction choices may differ: out atol 1e-2·max,
// lse 1e-4). T around the 128-query tile, D 64 and 128 (the dispatch sends D = 64 to v1, so v2 is
// called directly here), causal and full, GQA and MHA, plus a peaked softmax (scale 3) so that the
// running max moves between key tiles in both m-tiles of a warp; and v2 repeats bit for bit.
TEST(FlashAttentionCuda, ForwardVariantsAroundQueryTile) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  uint64_t seed = 14000;
  int n = 0, v3_cases = 0;
  for (int64_t T : {1, 17, 64, 100, 127, 128, 129, 191, 192, 193, 255, 257, 300})
    for (bool causal : {true, false})
      for (int64_t D : {64, 128}) {
        ++n;
        const VCase c{2, T, n % 2 ? 8 : 4, n % 2 ? 2 : 4, D, causal, n % 3 ? DType::bf16 : DType::f16};
        const float scale = n % 5 == 0 ? 3.f : 1.f / std::sqrt(static_cast<float>(D));
        SCOPED_TRACE(testing::Message() << c << " scale=" << scale);
        const Tensor qh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed += 10, c.dt);
        const Tensor kh = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 1, c.dt);
        const Tensor vh = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 2, c.dt);
        const Tensor q = qh.to(gpu), k = kh.to(gpu), v = vh.to(gpu);
        Tensor lse_ref, lse1, lse2, lse2b;
        const Tensor ref = attention_forward(qh, kh, vh, scale, causal, &lse_ref);
        const Tensor o1 = cuda::flash_attention_forward_v1(q, k, v, scale, causal, &lse1);
        const Tensor o2 = cuda::flash_attention_forward_v2(q, k, v, scale, causal, &lse2);
        const Tensor o2b = cuda::flash_attention_forward_v2(q, k, v, scale, causal, &lse2b);
        ASSERT_EQ(o2.shape(), qh.shape());
        ASSERT_EQ(o2.dtype(), c.dt);
        ASSERT_EQ(lse2.shape(), (Shape{c.B, c.Hq, c.T}));
        EXPECT_TRUE(close_scaled(o2, ref, 2e-2f)) << "v2 out";
        EXPECT_TRUE(all_close(lse2.to(Device::cpu()), lse_ref, 2e-3f, 1e-3f)) << "v2 lse";
        EXPECT_TRUE(close_scaled(o2, o1, 1e-2f)) << "v2 vs v1 out";
        EXPECT_TRUE(all_close(lse2.to(Device::cpu()), lse1.to(Device::cpu()), 1e-4f, 1e-5f)) << "v2 vs v1 lse";
        EXPECT_TRUE(same_bits(o2, o2b)) << "v2 out differs on a rerun";
        EXPECT_TRUE(same_bits(lse2, lse2b)) << "v2 lse differs on a rerun";
        if (cuda::flash_forward_v3_available(q)) {  // wgmma (sm_90a build on an sm_90 GPU), D = 128
          Tensor lse3, lse3b;
          const Tensor o3 = cuda::flash_attention_forward_v3(q, k, v, scale, causal, &lse3);
          const Tensor o3b = cuda::flash_attention_forward_v3(q, k, v, scale, causal, &lse3b);
          ASSERT_EQ(o3.shape(), qh.shape());
          EXPECT_TRUE(close_scaled(o3, ref, 2e-2f)) << "v3 out";
          EXPECT_TRUE(all_close(lse3.to(Device::cpu()), lse_ref, 2e-3f, 1e-3f)) << "v3 lse";
          EXPECT_TRUE(close_scaled(o3, o1, 1e-2f)) << "v3 vs v1 out";
          EXPECT_TRUE(all_close(lse3.to(Device::cpu()), lse1.to(Device::cpu()), 1e-4f, 1e-5f)) << "v3 vs v1 lse";
          EXPECT_TRUE(same_bits(o3, o3b)) << "v3 out differs on a rerun";
          EXPECT_TRUE(same_bits(lse3, lse3b)) << "v3 lse differs on a rerun";
          ++v3_cases;
        }
      }
  // D = 128 on an H100 with the default (sm_90a) build must have exercised v3.
  if (cuda::flash_forward_v3_available(Tensor::empty(Shape{1, 1, 1, 128}, DType::bf16, gpu)))
    EXPECT_GT(v3_cases, 0);
}

// The forward switch: variant 1, and D = 64 whatever the variant, reach v1; D = 128 with 2 reaches v2,
// with 3 reaches v3 where it is available (else v1).
TEST(FlashAttentionCuda, ForwardVariantSwitchReachesKernels) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  const int saved = cuda::flash_forward_variant();
  for (int64_t D : {64, 128})
    for (int variant : {1, 2, 3}) {
      SCOPED_TRACE(testing::Message() << "D=" << D << " variant " << variant);
      const Tensor q = Tensor::uniform(Shape{1, 300, 4, D}, -1, 1, 15000 + D, DType::bf16).to(gpu);
      const Tensor k = Tensor::uniform(Shape{1, 300, 2, D}, -1, 1, 15001 + D, DType::bf16).to(gpu);
      const Tensor v = Tensor::uniform(Shape{1, 300, 2, D}, -1, 1, 15002 + D, DType::bf16).to(gpu);
      const float scale = 1.f / std::sqrt(static_cast<float>(D));
      cuda::set_flash_forward_variant(variant);
      Tensor l_switch, l_direct;
      const Tensor viaswitch = cuda::flash_attention_forward(q, k, v, scale, true, &l_switch);
      const bool v3 = variant == 3 && cuda::flash_forward_v3_available(q);
      const Tensor direct = v3 ? cuda::flash_attention_forward_v3(q, k, v, scale, true, &l_direct)
                            : variant != 2 || D == 64 ? cuda::flash_attention_forward_v1(q, k, v, scale, true, &l_direct)
                                                      : cuda::flash_attention_forward_v2(q, k, v, scale, true, &l_direct);
      EXPECT_TRUE(same_bits(viaswitch, direct)) << "out";
      EXPECT_TRUE(same_bits(l_switch, l_direct)) << "lse";
    }
  cuda::set_flash_forward_variant(saved);
}

// The forward switch itself (no GPU needed).
TEST(FlashAttentionDispatch, ForwardVariantSwitch) {
  const int saved = cuda::flash_forward_variant();
  EXPECT_TRUE(saved >= 1 && saved <= 3);
  cuda::set_flash_forward_variant(1);
  EXPECT_EQ(cuda::flash_forward_variant(), 1);
  cuda::set_flash_forward_variant(2);
  EXPECT_EQ(cuda::flash_forward_variant(), 2);
  cuda::set_flash_forward_variant(3);
  EXPECT_EQ(cuda::flash_forward_variant(), 3);
  EXPECT_THROW(cuda::set_flash_forward_variant(0), Error);
  EXPECT_THROW(cuda::set_flash_forward_variant(4), Error);
  cuda::set_flash_forward_variant(saved);
}

// The dispatching entry follows the switch: with variant 1 selected, flash_attention_backward
// equals flash_attention_backward_v1 bit for bit (deterministic mode), likewise for 2.
TEST(FlashAttentionCuda, BackwardVariantSwitchReachesKernels) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  const VCase c{1, 700, 8, 2, 128, true, DType::bf16};
  const float scale = 1.f / std::sqrt(128.f);
  const Tensor qh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, 13000, c.dt);
  const Tensor doh = Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, 13003, c.dt);
  const Tensor q = qh.to(gpu), dout = doh.to(gpu);
  const Tensor k = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, 13001, c.dt).to(gpu);
  const Tensor v = Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, 13002, c.dt).to(gpu);
  Tensor lse;
  const Tensor out = attention_forward(q, k, v, scale, true, &lse);
  const Tensor delta = delta_of(out.to(Device::cpu()), doh, c);
  const int saved = cuda::flash_backward_variant();
  for (int variant : {1, 2, 3}) {
    SCOPED_TRACE(testing::Message() << "variant " << variant);
    cuda::set_flash_backward_variant(variant);
    const AttentionGrads viaswitch = cuda::flash_attention_backward(dout, q, k, v, delta, lse, scale, true, 0, true);
    const bool v3 = variant == 3 && cuda::flash_backward_v3_available(q);
    const AttentionGrads direct =
        variant == 1 ? cuda::flash_attention_backward_v1(dout, q, k, v, delta, lse, scale, true, 0, true)
        : v3         ? cuda::flash_attention_backward_v3(dout, q, k, v, delta, lse, scale, true, 0, true)
                     : cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, true, 0, true);
    EXPECT_TRUE(same_bits(viaswitch.dq, direct.dq)) << "dq";
    EXPECT_TRUE(same_bits(viaswitch.dk, direct.dk)) << "dk";
  }
  cuda::set_flash_backward_variant(saved);
}
// Variant 2's query chunks (1 or 2 per 64-query tile) add the same products in the same order:
// identical bits in both modes' deterministic path, on the shapes around the key tile (edge, dead and
// diagonal chunks), MHA and GQA with splits, D 64 and 128, causal and full. Atomic mode only to
// tolerance (its fp32 adds race).
TEST(FlashAttentionCuda, BackwardQueryChunksGiveSameBits) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  const int saved = cuda::flash_backward_query_chunks();
  uint64_t seed = 14000;
  int n = 0;
  for (int64_t T : {64, 100, 129, 192, 320, 1000})
    for (bool causal : {true, false}) {
      ++n;
      const VCase c{n % 3 ? int64_t{1} : int64_t{2}, T, 8, n % 2 ? int64_t{2} : int64_t{8}, n % 4 < 2 ? 128 : 64,
                    causal, n % 3 ? DType::bf16 : DType::f16};
      SCOPED_TRACE(testing::Message() << c);
      const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
      const BwdInputs in = bwd_inputs(c, seed += 10, scale, causal, gpu);
      const auto& [q, k, v, dout, lse, delta] = in;
      cuda::set_flash_backward_query_chunks(1);
      const AttentionGrads ref = cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, 0, true);
      const AttentionGrads ref_atomic =
          cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, 0, false);
      for (int chunks : {2}) {
        SCOPED_TRACE(testing::Message() << chunks << " chunks");
        cuda::set_flash_backward_query_chunks(chunks);
        const AttentionGrads g = cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, 0, true);
        EXPECT_TRUE(same_bits(g.dq, ref.dq)) << "dq";
        EXPECT_TRUE(same_bits(g.dk, ref.dk)) << "dk";
        EXPECT_TRUE(same_bits(g.dv, ref.dv)) << "dv";
        const AttentionGrads a = cuda::flash_attention_backward_v2(dout, q, k, v, delta, lse, scale, causal, 0, false);
        EXPECT_TRUE(close_scaled(a.dq, ref_atomic.dq, 1e-2f)) << "atomic dq";
        EXPECT_TRUE(close_scaled(a.dk, ref_atomic.dk, 1e-2f)) << "atomic dk";
      }
    }
  cuda::set_flash_backward_query_chunks(saved);
}

// Variant 3's two forms give the same bits in the deterministic mode: the plain form
// (OMNIQ_FLASH_BWD_V3_WS=0) and the warp-specialised default (dQ parts sent by a third warpgroup with
// bulk stores / reduce-adds): the same products, summed in the same order. Over edge, dead and diagonal
// tiles, MHA and GQA (with 2 kv splits: the ordered dK/dV turns), causal and full, bf16 and f16,
// B = 1 and 2. Atomic mode to tolerance (its fp32 adds race).
TEST(FlashAttentionCuda, BackwardV3FormsGiveSameBits) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  if (!cuda::flash_backward_v3_available(Tensor::empty(Shape{1, 64, 1, 128}, DType::bf16, gpu)))
    GTEST_SKIP() << "no wgmma kernel on this GPU / build";
  auto run = [&](const char* ws, const BwdInputs& in, float scale, bool causal, int splits, bool det) {
    setenv("OMNIQ_FLASH_BWD_V3_WS", ws, 1);
    AttentionGrads g =
        cuda::flash_attention_backward_v3(in.dout, in.q, in.k, in.v, in.delta, in.lse, scale, causal, splits, det);
    unsetenv("OMNIQ_FLASH_BWD_V3_WS");
    return g;
  };
  uint64_t seed = 15000;
  int n = 0;
  for (int64_t T : {1, 64, 100, 129, 192, 320, 1000, 2048})
    for (bool causal : {true, false}) {
      ++n;
      const VCase c{n % 3 ? int64_t{1} : int64_t{2}, T, 8, n % 2 ? int64_t{2} : int64_t{8}, 128, causal,
                    n % 3 ? DType::bf16 : DType::f16};
      const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
      const BwdInputs in = bwd_inputs(c, seed += 10, scale, causal, gpu);
      for (int splits : {0, 2}) {
        if (splits == 2 && c.Hq == c.Hkv) continue;
        SCOPED_TRACE(testing::Message() << c << " splits " << splits);
        const AttentionGrads ref = run("0", in, scale, causal, splits, true);
        for (const char* ws : {"0", "1"}) {
          SCOPED_TRACE(testing::Message() << "ws " << ws);
          const AttentionGrads g = run(ws, in, scale, causal, splits, true);
          EXPECT_TRUE(same_bits(g.dq, ref.dq)) << "dq";
          EXPECT_TRUE(same_bits(g.dk, ref.dk)) << "dk";
          EXPECT_TRUE(same_bits(g.dv, ref.dv)) << "dv";
          const AttentionGrads a = run(ws, in, scale, causal, splits, false);
          EXPECT_TRUE(close_scaled(a.dq, ref.dq, 1e-2f)) << "atomic dq";
          EXPECT_TRUE(close_scaled(a.dk, ref.dk, 1e-2f)) << "atomic dk";
          EXPECT_TRUE(close_scaled(a.dv, ref.dv, 1e-2f)) << "atomic dv";
        }
      }
    }
}

// The chunk setting: explicit set wins, bad values rejected (no GPU needed).
TEST(FlashAttentionDispatch, BackwardQueryChunksSwitch) {
  const int saved = cuda::flash_backward_query_chunks();
  for (int c : {1, 2}) {
    cuda::set_flash_backward_query_chunks(c);
    EXPECT_EQ(cuda::flash_backward_query_chunks(), c);
  }
  EXPECT_THROW(cuda::set_flash_backward_query_chunks(4), Error);
  cuda::set_flash_backward_query_chunks(saved);
}
#endif

}  // namespace
}  // namespace omniq
