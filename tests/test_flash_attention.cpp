// Flash attention (ops/cuda/flash_attention.cu, reached through attention_forward/backward for
// bf16/f16 with D ∈ {64, 128}) against the CPU reference run on the same 16-bit-rounded inputs.
//
// Coverage: bf16 and f16; D 64 and 128; causal and full; GQA (Hq=8, Hkv=2), MHA and MQA; T that are
// not multiples of the 64-row tile (1, 17, 100, 257, 300) and T = 1024 with B = 2; softmax peaked
// enough that the running max moves between key tiles; T = 4096 with an O(T) memory check (the
// materialised path would need Hq·T²·4 bytes = 256 MiB of scores there).
//
// Tolerances (|got − ref| ≤ atol + rtol·|ref|):
//   out      rtol 2e-2, atol 2e-2·max|ref|  (P is rounded to 16 bits before P·V; max|ref| floored at 1e-3)
//   lse      rtol 1e-3, atol 2e-3           (fp32 on both sides, exact 16-bit products)
//   dq/dk/dv bf16 rtol 3e-2, atol 3e-2·max|ref|; f16 1e-2 (P and dS rounded before their GEMMs)
// The backward comparison feeds both backends the CUDA forward's out/lse, isolating the backward.
// Backward tests run in both modes of the backward (deterministic: ordered fp32 adds; atomic: fp32
// atomics in scheduling order); the deterministic mode must moreover give bitwise identical dq, dk,
// dv on every rerun (memcmp), at shapes with long key-tile chains, kv splits and several waves.
// Every backward check runs both backward kernels (cuda::set_flash_backward_variant: 2, the
// default with 128-key CTAs, and 1, the previous 64-key one kept for A/B runs); variant-specific
// edge cases and v1-vs-v2 agreement are in tests/test_flash_attention_variants.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <vector>

#include "ops/attention.h"
#include "runtime/allocator.h"
#include "runtime/error.h"
#include "tests/flash_attention_test_util.h"
#include "tests/support/test_support.h"
#ifdef OMNIQ_HAS_CUDA
#include "ops/cuda/flash_attention.h"
#endif

namespace omniq {
namespace {

using test::all_close;
// Shared with test_flash_attention_variants.cpp (tests/flash_attention_test_util.h).
using fa_test::close_scaled;
using fa_test::delta_of;
using fa_test::same_bits;

struct Case {
  int64_t B, T, Hq, Hkv, D;
  bool causal;
  DType dt;
  float scale;  // 0: 1/sqrt(D)
  float sc() const { return scale != 0.f ? scale : 1.f / std::sqrt(static_cast<float>(D)); }
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << dtype_name(c.dt) << " B=" << c.B << " T=" << c.T << " Hq=" << c.Hq << " Hkv=" << c.Hkv
            << " D=" << c.D << (c.causal ? " causal" : " full") << " scale=" << c.sc();
}

struct Inputs {
  Tensor q, k, v, dout;  // CPU, in the case's dtype
};
Inputs make_inputs(const Case& c, uint64_t seed) {
  return {Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed, c.dt),
          Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 1, c.dt),
          Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 2, c.dt),
          Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed + 3, c.dt)};
}

float grad_rel(DType dt) { return dt == DType::bf16 ? 3e-2f : 1e-2f; }

// Sets the process-wide backward mode for a scope (the tests share one process).
class ScopedDeterminism {
 public:
  explicit ScopedDeterminism(bool on) : saved_(attention_deterministic()) { set_attention_deterministic(on); }
  ~ScopedDeterminism() { set_attention_deterministic(saved_); }
  ScopedDeterminism(const ScopedDeterminism&) = delete;
  ScopedDeterminism& operator=(const ScopedDeterminism&) = delete;

 private:
  bool saved_;
};

const char* mode_name(bool deterministic) { return deterministic ? "deterministic" : "atomic"; }

// Selects a backward kernel variant for a scope (no-op without CUDA, where the tests skip).
class ScopedBwdVariant {
 public:
#ifdef OMNIQ_HAS_CUDA
  explicit ScopedBwdVariant(int variant) : saved_(cuda::flash_backward_variant()) {
    cuda::set_flash_backward_variant(variant);
  }
  ~ScopedBwdVariant() { cuda::set_flash_backward_variant(saved_); }
#else
  explicit ScopedBwdVariant(int) {}
#endif
  ScopedBwdVariant(const ScopedBwdVariant&) = delete;
  ScopedBwdVariant& operator=(const ScopedBwdVariant&) = delete;

 private:
  int saved_ = 0;
};
constexpr int kBwdVariants[] = {2, 1};

// Forward (out, lse) and backward (dq, dk, dv) of one case, CUDA vs CPU.
void check_case(const Case& c, uint64_t seed, bool backward = true) {
  SCOPED_TRACE(testing::Message() << c);
  const Inputs in = make_inputs(c, seed);
  const Device gpu = Device::cuda();
  const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
  const float scale = c.sc();

  Tensor lse_ref, lse;
  const Tensor ref = attention_forward(in.q, in.k, in.v, scale, c.causal, &lse_ref);
  const Tensor out = attention_forward(q, k, v, scale, c.causal, &lse);
  ASSERT_EQ(out.dtype(), c.dt);
  ASSERT_EQ(out.shape(), in.q.shape());
  ASSERT_EQ(lse.shape(), (Shape{c.B, c.Hq, c.T}));
  ASSERT_EQ(lse.dtype(), DType::f32);
  EXPECT_TRUE(close_scaled(out, ref, 2e-2f)) << "out";
  EXPECT_TRUE(all_close(lse.to(Device::cpu()), lse_ref, 2e-3f, 1e-3f)) << "lse";
  if (!backward) return;

  const AttentionGrads want =
      attention_backward(in.dout, in.q, in.k, in.v, out.to(Device::cpu()), lse.to(Device::cpu()), scale, c.causal);
  for (int variant : kBwdVariants) {
    ScopedBwdVariant sv(variant);
    SCOPED_TRACE(testing::Message() << "backward variant " << variant);
    const AttentionGrads got = attention_backward(dout, q, k, v, out, lse, scale, c.causal);
    ASSERT_EQ(got.dq.dtype(), c.dt);
    ASSERT_EQ(got.dk.dtype(), c.dt);
    ASSERT_EQ(got.dq.shape(), in.q.shape());
    ASSERT_EQ(got.dk.shape(), in.k.shape());
    ASSERT_EQ(got.dv.shape(), in.v.shape());
    const float rel = grad_rel(c.dt);
    EXPECT_TRUE(close_scaled(got.dq, want.dq, rel)) << "dq";
    EXPECT_TRUE(close_scaled(got.dk, want.dk, rel)) << "dk";
    EXPECT_TRUE(close_scaled(got.dv, want.dv, rel)) << "dv";
  }
}

// ---------------------------------------------------------------------------------------------
// Which path serves which inputs (host-side predicate; runs without a GPU).

#ifdef OMNIQ_HAS_CUDA
TEST(FlashAttentionDispatch, SupportedInputs) {
  auto supported = [](int64_t T, int64_t Hq, int64_t Hkv, int64_t D, DType dt) {
    const Tensor q = Tensor::zeros(Shape{1, T, Hq, D}, dt), kv = Tensor::zeros(Shape{1, T, Hkv, D}, dt);
    return cuda::flash_attention_supported(q, kv, kv, &q);
  };
  EXPECT_TRUE(supported(17, 8, 2, 128, DType::bf16));
  EXPECT_TRUE(supported(1, 4, 4, 64, DType::f16));
  EXPECT_FALSE(supported(17, 4, 4, 128, DType::f32));
  EXPECT_FALSE(supported(17, 4, 4, 96, DType::bf16));
  EXPECT_FALSE(supported(17, 4, 4, 16, DType::bf16));
}

// Backward kv-head splits: none for MHA; for the 70B shape (H=64, Hkv=8, 32 key tiles = 256 CTAs on
// 132 SMs) the fewest that give >= 4 CTAs per SM; all G when even that is not enough.
TEST(FlashAttentionDispatch, KvSplits) {
  EXPECT_EQ(cuda::flash_attention_kv_splits(1, 2048, 32, 32, 132), 1);
  EXPECT_EQ(cuda::flash_attention_kv_splits(1, 2048, 64, 8, 132), 4);
  EXPECT_EQ(cuda::flash_attention_kv_splits(4, 2048, 64, 8, 132), 1);
  EXPECT_EQ(cuda::flash_attention_kv_splits(1, 100, 8, 2, 132), 4);
  EXPECT_EQ(cuda::flash_attention_kv_splits(1, 2048, 12, 4, 16), 1);
}
#endif

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

// Every (dtype, D, causal, T) with GQA and with MHA, B = 2; no T is a multiple of the 64-row tile.
TEST(FlashAttentionCuda, TileEdgesAllVariants) {
  OMNIQ_REQUIRE_CUDA();
  for (bool det : {true, false}) {
    ScopedDeterminism mode(det);
    SCOPED_TRACE(mode_name(det));
    uint64_t seed = 1000;
    for (DType dt : {DType::bf16, DType::f16})
      for (int64_t D : {64, 128})
        for (bool causal : {true, false})
          for (int64_t T : {1, 17, 100, 257}) {
            check_case({2, T, 8, 2, D, causal, dt, 0.f}, seed += 10);  // GQA, G = 4
            check_case({2, T, 4, 4, D, causal, dt, 0.f}, seed += 10);  // MHA
          }
  }
}

// Exact tile multiples (64, 128) and MQA (every query head on one kv head, G = 8).
TEST(FlashAttentionCuda, TileMultiplesAndMqa) {
  OMNIQ_REQUIRE_CUDA();
  for (bool det : {true, false}) {
    ScopedDeterminism mode(det);
    SCOPED_TRACE(mode_name(det));
    check_case({1, 64, 4, 2, 128, true, DType::bf16, 0.f}, 2000);
    check_case({2, 128, 4, 4, 64, false, DType::bf16, 0.f}, 2010);
    check_case({1, 200, 8, 1, 128, true, DType::bf16, 0.f}, 2020);
    check_case({1, 200, 8, 1, 64, false, DType::f16, 0.f}, 2030);
  }
}

// Large scale → scores spread over ±20: softmax nearly one-hot, the running max changes from key
// tile to key tile, so the online rescaling (alpha) of O and l is exercised for real.
TEST(FlashAttentionCuda, PeakedSoftmax) {
  OMNIQ_REQUIRE_CUDA();
  for (bool det : {true, false}) {
    ScopedDeterminism mode(det);
    SCOPED_TRACE(mode_name(det));
    for (bool causal : {true, false}) {
      check_case({2, 300, 4, 2, 64, causal, DType::bf16, 3.f}, 3000 + causal);
      check_case({1, 300, 4, 2, 128, causal, DType::f16, 2.f}, 3010 + causal);
    }
  }
}

// The calibration-like length with B = 2 (16 key tiles: long ordered chains).
TEST(FlashAttentionCuda, T1024) {
  OMNIQ_REQUIRE_CUDA();
  for (bool det : {true, false}) {
    ScopedDeterminism mode(det);
    SCOPED_TRACE(mode_name(det));
    check_case({2, 1024, 8, 2, 128, true, DType::bf16, 0.f}, 4000);
    check_case({2, 1024, 4, 4, 64, false, DType::f16, 0.f}, 4010);
  }
}

// lse_out = nullptr still gives the same output (the kernel always computes lse internally).
TEST(FlashAttentionCuda, WithoutLse) {
  OMNIQ_REQUIRE_CUDA();
  const Case c{1, 77, 4, 2, 128, true, DType::bf16, 0.f};
  const Inputs in = make_inputs(c, 5000);
  const Device gpu = Device::cuda();
  const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu);
  Tensor lse;
  const Tensor a = attention_forward(q, k, v, c.sc(), true, &lse);
  const Tensor b = attention_forward(q, k, v, c.sc(), true, nullptr);
  EXPECT_TRUE(all_close(b.to(Device::cpu()), a.to(Device::cpu()), 0.f, 0.f));  // deterministic kernel
}

// T = 4096 runs, matches, and stays O(T) in memory: the scratch above the inputs is the outputs,
// lse/delta and the fp32 dQ accumulator (~20 MiB), where the materialised path needs > 256 MiB.
TEST(FlashAttentionCuda, LongSequenceO_T_Memory) {
  OMNIQ_REQUIRE_CUDA();
  const Case c{1, 4096, 4, 2, 128, true, DType::bf16, 0.f};
  SCOPED_TRACE(testing::Message() << c);
  const Inputs in = make_inputs(c, 6000);
  const Device gpu = Device::cuda();
  const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
  const float scale = c.sc();

  for (int variant : kBwdVariants) {
    ScopedBwdVariant sv(variant);
    SCOPED_TRACE(testing::Message() << "backward variant " << variant);
    reset_peak_memory(gpu);
    const int64_t live0 = memory_stats(gpu).live_bytes;
    Tensor lse;
    const Tensor out = attention_forward(q, k, v, scale, true, &lse);
    const AttentionGrads got = attention_backward(dout, q, k, v, out, lse, scale, true);
    const double scratch_mib = (memory_stats(gpu).peak_bytes - live0) / 1048576.0;
    EXPECT_LT(scratch_mib, 64.0) << "attention scratch is not O(T): the flash path was not taken?";

    Tensor lse_ref;
    const Tensor ref = attention_forward(in.q, in.k, in.v, scale, true, &lse_ref);
    EXPECT_TRUE(close_scaled(out, ref, 2e-2f)) << "out";
    EXPECT_TRUE(all_close(lse.to(Device::cpu()), lse_ref, 2e-3f, 1e-3f)) << "lse";
    const AttentionGrads want =
        attention_backward(in.dout, in.q, in.k, in.v, out.to(Device::cpu()), lse.to(Device::cpu()), scale, true);
    EXPECT_TRUE(close_scaled(got.dq, want.dq, 3e-2f)) << "dq";
    EXPECT_TRUE(close_scaled(got.dk, want.dk, 3e-2f)) << "dk";
    EXPECT_TRUE(close_scaled(got.dv, want.dv, 3e-2f)) << "dv";
  }
}

#ifdef OMNIQ_HAS_CUDA
// Every split of the G = 4 query heads per kv head (1: one CTA loops over all 4 heads and stores
// dK/dV; 2: two heads per CTA; 4: one each, dK/dV summed by fp32 atomics) gives the CPU gradients.
TEST(FlashAttentionCuda, BackwardKvSplits) {
  OMNIQ_REQUIRE_CUDA();
  for (int variant : kBwdVariants)
    for (bool det : {true, false})
      for (bool causal : {true, false})
        for (int splits : {1, 2, 4}) {
          ScopedBwdVariant sv(variant);
          const Case c{2, 150, 8, 2, 128, causal, DType::bf16, 0.f};
          SCOPED_TRACE(testing::Message()
                       << c << " splits=" << splits << " " << mode_name(det) << " variant " << variant);
          const Inputs in = make_inputs(c, 8000 + splits);
          const Device gpu = Device::cuda();
          const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
          Tensor lse;
          const Tensor out = attention_forward(q, k, v, c.sc(), causal, &lse);
          const Tensor out_h = out.to(Device::cpu());
          const Tensor delta_d = delta_of(out_h, in.dout, c);
          const AttentionGrads got =
              cuda::flash_attention_backward(dout, q, k, v, delta_d, lse, c.sc(), causal, splits, det);
          const AttentionGrads want =
              attention_backward(in.dout, in.q, in.k, in.v, out_h, lse.to(Device::cpu()), c.sc(), causal);
          EXPECT_TRUE(close_scaled(got.dq, want.dq, 3e-2f)) << "dq";
          EXPECT_TRUE(close_scaled(got.dk, want.dk, 3e-2f)) << "dk";
          EXPECT_TRUE(close_scaled(got.dv, want.dv, 3e-2f)) << "dv";
        }
}

// Deterministic mode: three backwards on the same inputs, the third after other attention work
// has reused the memory pool (so its scratch and turn counters land on dirty, recycled blocks),
// must agree bit for bit, and agree with the atomic mode up to fp32 summation order. Shapes: long
// chains of key tiles (T = 2048: 32 per query tile), full and causal, GQA with every kv split
// (the 70B shape with the automatic split too), MQA, T off the tile grid, D 64/128, bf16/f16, and
// grids of several waves (1024+ CTAs for ~264 resident), which is where ordering meets residency.
// The atomic mode's run-to-run differences are printed (not asserted: they are timing-dependent)
// to show the comparison would see them.
TEST(FlashAttentionCuda, DeterministicBackwardIsBitwiseReproducible) {
  OMNIQ_REQUIRE_CUDA();
  struct DetCase {
    Case c;
    int splits;  // 0: automatic
  };
  const DetCase cases[] = {
      {{1, 1000, 8, 2, 128, false, DType::bf16, 0.f}, 4},
      {{1, 1000, 8, 2, 128, true, DType::bf16, 0.f}, 2},
      {{2, 300, 8, 2, 64, true, DType::f16, 0.f}, 1},
      {{2, 300, 8, 2, 64, false, DType::f16, 0.f}, 4},
      {{1, 777, 8, 1, 64, false, DType::bf16, 0.f}, 8},
      {{2, 130, 4, 4, 128, false, DType::f16, 0.f}, 0},
      {{2, 2048, 16, 16, 128, false, DType::bf16, 0.f}, 0},  // 1024 CTAs, 32-long chains
      {{1, 2048, 64, 8, 128, true, DType::bf16, 0.f}, 0},    // LLaMA-2-70B GQA, automatic splits
      {{4, 2048, 32, 32, 64, true, DType::f16, 0.f}, 0},     // 4096 CTAs
  };
  const Device gpu = Device::cuda();
  for (int variant : kBwdVariants) {
    ScopedBwdVariant sv(variant);
    uint64_t seed = 9000;
    for (const DetCase& dc : cases) {
      const Case& c = dc.c;
      SCOPED_TRACE(testing::Message() << c << " splits=" << dc.splits << " variant " << variant);
      const Inputs in = make_inputs(c, seed += 10);
      const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
      Tensor lse;
      const Tensor out = attention_forward(q, k, v, c.sc(), c.causal, &lse);
      const Tensor delta = delta_of(out.to(Device::cpu()), in.dout, c);
      auto run = [&](bool det) {
        return cuda::flash_attention_backward(dout, q, k, v, delta, lse, c.sc(), c.causal, dc.splits, det);
      };
      const AttentionGrads first = run(true);
      const AttentionGrads second = run(true);
      // Other work in between: the atomic backward and a forward+backward of another shape.
      const AttentionGrads atomic1 = run(false);
      {
        const Case o{1, 200, 4, 2, c.D, !c.causal, c.dt, 0.f};
        const Inputs oi = make_inputs(o, seed + 5);
        Tensor olse;
        const Tensor oq = oi.q.to(gpu), ok = oi.k.to(gpu), ov = oi.v.to(gpu);
        const Tensor oout = attention_forward(oq, ok, ov, o.sc(), o.causal, &olse);
        const AttentionGrads og = attention_backward(oi.dout.to(gpu), oq, ok, ov, oout, olse, o.sc(), o.causal);
      }
      const AttentionGrads third = run(true);
      for (const AttentionGrads* g : {&second, &third}) {
        const char* which = g == &second ? "second run" : "third run";
        EXPECT_TRUE(same_bits(g->dq, first.dq)) << "dq differs on the " << which;
        EXPECT_TRUE(same_bits(g->dk, first.dk)) << "dk differs on the " << which;
        EXPECT_TRUE(same_bits(g->dv, first.dv)) << "dv differs on the " << which;
      }
      // Same math as the atomic path: only the fp32 summation order differs (≪ a 16-bit ulp of the
      // largest entries; the CPU-reference checks of both modes are in the tests above).
      EXPECT_TRUE(close_scaled(first.dq, atomic1.dq, 1e-2f)) << "dq vs atomic mode";
      EXPECT_TRUE(close_scaled(first.dk, atomic1.dk, 1e-2f)) << "dk vs atomic mode";
      EXPECT_TRUE(close_scaled(first.dv, atomic1.dv, 1e-2f)) << "dv vs atomic mode";
      const AttentionGrads atomic2 = run(false);
      std::cout << "[ info ] v" << variant << " " << c << " splits=" << dc.splits
                << ": atomic mode reruns bitwise equal: dq " << same_bits(atomic1.dq, atomic2.dq) << " dk "
                << same_bits(atomic1.dk, atomic2.dk) << " dv " << same_bits(atomic1.dv, atomic2.dv)
                << "; deterministic vs atomic equal: dq " << same_bits(first.dq, atomic1.dq) << "\n";
    }
  }
}

// Many back-to-back deterministic backwards at the LLaMA-2-7B (MHA) and 70B (GQA, split dK/dV)
// shapes must all give the first run's bits: the ordered hand-offs (a CTA-wide release by thread 0
// after a barrier) leave no window for a successor to read a partial sum, whatever the timing.
TEST(FlashAttentionCuda, DeterministicBackwardStress) {
  OMNIQ_REQUIRE_CUDA();
  const Case cases[] = {{1, 2048, 32, 32, 128, true, DType::bf16, 0.f}, {1, 2048, 64, 8, 128, true, DType::bf16, 0.f}};
  const Device gpu = Device::cuda();
  uint64_t seed = 9500;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << c);
    const Inputs in = make_inputs(c, seed += 10);
    const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
    Tensor lse;
    const Tensor out = attention_forward(q, k, v, c.sc(), c.causal, &lse);
    const Tensor delta = delta_of(out.to(Device::cpu()), in.dout, c);
    const AttentionGrads first = cuda::flash_attention_backward(dout, q, k, v, delta, lse, c.sc(), c.causal, 0, true);
    int bad = 0;
    for (int rep = 0; rep < 60; ++rep) {
      const AttentionGrads g = cuda::flash_attention_backward(dout, q, k, v, delta, lse, c.sc(), c.causal, 0, true);
      bad += !same_bits(g.dq, first.dq) || !same_bits(g.dk, first.dk) || !same_bits(g.dv, first.dv);
    }
    EXPECT_EQ(bad, 0) << bad << " of 60 repeats differ from the first run";
  }
}

// The process-wide mode reaches the dispatching attention_backward (which computes delta itself):
// deterministic, it repeats bit for bit, with dirty pool memory in between; atomic, it agrees up to
// summation order. (Both match the CPU in the tests above.)
TEST(FlashAttentionCuda, ProcessWideSwitchReachesDispatch) {
  OMNIQ_REQUIRE_CUDA();
  const Case c{1, 1000, 8, 2, 128, false, DType::bf16, 0.f};
  const Inputs in = make_inputs(c, 9500);
  const Device gpu = Device::cuda();
  const Tensor q = in.q.to(gpu), k = in.k.to(gpu), v = in.v.to(gpu), dout = in.dout.to(gpu);
  Tensor lse;
  const Tensor out = attention_forward(q, k, v, c.sc(), false, &lse);
  for (int variant : kBwdVariants) {
    ScopedBwdVariant sv(variant);
    SCOPED_TRACE(testing::Message() << "backward variant " << variant);
    AttentionGrads a, b, n;
    {
      ScopedDeterminism mode(true);
      a = attention_backward(dout, q, k, v, out, lse, c.sc(), false);
    }
    {
      ScopedDeterminism mode(false);
      n = attention_backward(dout, q, k, v, out, lse, c.sc(), false);
    }
    {
      ScopedDeterminism mode(true);
      b = attention_backward(dout, q, k, v, out, lse, c.sc(), false);
    }
    EXPECT_TRUE(same_bits(a.dq, b.dq)) << "dq";
    EXPECT_TRUE(same_bits(a.dk, b.dk)) << "dk";
    EXPECT_TRUE(same_bits(a.dv, b.dv)) << "dv";
    EXPECT_TRUE(close_scaled(n.dq, a.dq, 1e-2f)) << "dq atomic vs deterministic";
    EXPECT_TRUE(close_scaled(n.dk, a.dk, 1e-2f)) << "dk atomic vs deterministic";
  }
}
#endif

// The switch itself (no GPU needed): set/get round trip, restored afterwards.
TEST(AttentionDeterminism, SetAndQuery) {
  const bool saved = attention_deterministic();
  set_attention_deterministic(false);
  EXPECT_FALSE(attention_deterministic());
  set_attention_deterministic(true);
  EXPECT_TRUE(attention_deterministic());
  set_attention_deterministic(saved);
}

// Other head sizes stay on the materialised path and still work (dispatch fallback).
TEST(FlashAttentionCuda, FallbackHeadDim) {
  OMNIQ_REQUIRE_CUDA();
  check_case({1, 50, 4, 2, 32, true, DType::bf16, 0.f}, 7000);
}

}  // namespace
}  // namespace omniq
