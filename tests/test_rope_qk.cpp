// RoPE of q and k together (ops/rope.h rope_forward_qk / rope_backward_qk, ag::rope_qk): the same
// bits as two separate rope calls on the CPU and on CUDA (where it is one launch), CUDA vs CPU,
// finite-difference gradients, GQA head counts, the fallback layouts, and the autograd function's
// hand-over of q's gradient to k's node (including a q' or k' that does not reach the loss).
#include <cstring>
#include <tuple>
#include <string>
#include <vector>

#include "autograd/functions.h"
#include "ops/rope.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

::testing::AssertionResult same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    return ::testing::AssertionFailure() << a.str() << " vs " << b.str();
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  if (std::memcmp(ha.data(), hb.data(), ha.nbytes()) == 0) return ::testing::AssertionSuccess();
  const std::vector<float> fa = ha.to_f32_vector(), fb = hb.to_f32_vector();
  for (size_t i = 0; i < fa.size(); ++i)
    if (fa[i] != fb[i])
      return ::testing::AssertionFailure() << "first difference at " << i << ": " << fa[i] << " vs " << fb[i];
  return ::testing::AssertionFailure() << "bits differ (NaN payload or signed zero)";
}

double weighted_sum(const Tensor& y, const std::vector<float>& w) {
  std::vector<float> v = y.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += static_cast<double>(v[i]) * w[i];
  return s;
}

struct QkCase {
  int64_t B, T, Hq, Hk, D, off;
  float theta;
};

// rope_forward_qk / rope_backward_qk against rope_forward / rope_backward on each tensor.
void expect_same_as_separate(const QkCase& c, DType dt, Device dev) {
  Tensor q = Tensor::uniform({c.B, c.T, c.Hq, c.D}, -1, 1, 1, dt, dev);
  Tensor k = Tensor::uniform({c.B, c.T, c.Hk, c.D}, -1, 1, 2, dt, dev);
  const std::string what = std::string(dtype_name(dt)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) +
                           " Hq" + std::to_string(c.Hq) + " Hk" + std::to_string(c.Hk) + " D" + std::to_string(c.D);
  RopeQk f = rope_forward_qk(q, k, c.theta, c.off);
  EXPECT_TRUE(same_bits(f.q, rope_forward(q, c.theta, c.off))) << "forward q " << what;
  EXPECT_TRUE(same_bits(f.k, rope_forward(k, c.theta, c.off))) << "forward k " << what;
  RopeQk b = rope_backward_qk(q, k, c.theta, c.off);
  EXPECT_TRUE(same_bits(b.q, rope_backward(q, c.theta, c.off))) << "backward q " << what;
  EXPECT_TRUE(same_bits(b.k, rope_backward(k, c.theta, c.off))) << "backward k " << what;
}

const QkCase kCases[] = {
    {1, 16, 4, 4, 64, 0, 10000.0f},       // MHA
    {2, 37, 8, 2, 128, 5, 500000.0f},     // GQA, odd T, offset
    {1, 9, 6, 3, 32, 0, 10000.0f},        // head counts not multiples of the 4 heads per thread
    {1, 5, 3, 1, 12, 2, 10000.0f},        // D/2 = 6: not a 16-byte pack in bf16 (two-call fallback)
    {1, 4, 2, 2, 6, 0, 10000.0f},         // D/2 = 3: the per-pair kernel for both dtypes
};

// Gradients through the tape: ag::rope_qk against two ag::rope, for a loss of q' and k' (or only one).
struct QkGrads {
  Tensor dq, dk;
};
enum class Uses { both, q_only, k_only };

QkGrads tape_grads(const Tensor& q0, const Tensor& k0, bool fused, Uses uses) {
  ag::Tape t;
  ag::Var q = ag::constant(q0.alias()), k = ag::constant(k0.alias());
  q->requires_grad = k->requires_grad = true;  // intermediates: gradients keep the value's dtype
  ag::Var qo, ko;
  if (fused) {
    std::tie(qo, ko) = ag::rope_qk(t, q, k, 10000.0f, 3);
  } else {
    qo = ag::rope(t, q, 10000.0f, 3);
    ko = ag::rope(t, k, 10000.0f, 3);
  }
  Tensor tq = Tensor::uniform(q0.shape(), -1, 1, 7, q0.dtype(), q0.device());
  Tensor tk = Tensor::uniform(k0.shape(), -1, 1, 8, k0.dtype(), k0.device());
  ag::Var lq = ag::mse_loss(t, qo, ag::constant(tq.alias())), lk = ag::mse_loss(t, ko, ag::constant(tk.alias()));
  ag::Var loss = uses == Uses::both ? ag::add(t, lq, lk) : uses == Uses::q_only ? lq : lk;
  t.backward(loss);
  QkGrads g;
  if (q->grad.defined()) g.dq = q->grad.clone();
  if (k->grad.defined()) g.dk = k->grad.clone();
  return g;
}

void expect_tape_same_as_separate(DType dt, Device dev, int64_t T, int64_t Hq, int64_t Hk, int64_t D) {
  Tensor q = Tensor::uniform({1, T, Hq, D}, -1, 1, 3, dt, dev), k = Tensor::uniform({1, T, Hk, D}, -1, 1, 4, dt, dev);
  for (Uses u : {Uses::both, Uses::q_only, Uses::k_only}) {
    QkGrads a = tape_grads(q, k, false, u), b = tape_grads(q, k, true, u);
    const std::string what = std::string(dtype_name(dt)) + " uses " + std::to_string(static_cast<int>(u));
    EXPECT_EQ(a.dq.defined(), b.dq.defined()) << what;
    EXPECT_EQ(a.dk.defined(), b.dk.defined()) << what;
    EXPECT_EQ(b.dq.defined(), u != Uses::k_only) << what;
    EXPECT_EQ(b.dk.defined(), u != Uses::q_only) << what;
    if (a.dq.defined() && b.dq.defined()) EXPECT_TRUE(same_bits(a.dq, b.dq)) << "dq " << what;
    if (a.dk.defined() && b.dk.defined()) EXPECT_TRUE(same_bits(a.dk, b.dk)) << "dk " << what;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU

TEST(RopeQk, SameBitsAsSeparateCalls) {
  for (const QkCase& c : kCases)
    for (DType dt : {DType::f32, DType::bf16}) expect_same_as_separate(c, dt, Device::cpu());
}

TEST(RopeQk, BackwardMatchesFiniteDifferences) {
  Tensor q = Tensor::uniform({1, 5, 4, 8}, -1, 1, 11), k = Tensor::uniform({1, 5, 2, 8}, -1, 1, 12);
  const std::vector<float> wq = Tensor::uniform(q.shape(), -1, 1, 13).to_f32_vector();
  const std::vector<float> wk = Tensor::uniform(k.shape(), -1, 1, 14).to_f32_vector();
  RopeQk g = rope_backward_qk(Tensor::from_f32(wq, q.shape()), Tensor::from_f32(wk, k.shape()), 10000.0f, 7);
  auto loss = [&] {
    RopeQk y = rope_forward_qk(q, k, 10000.0f, 7);
    return weighted_sum(y.q, wq) + weighted_sum(y.k, wk);
  };
  EXPECT_TRUE(check_gradient(q, loss, g.q, 1e-3, 1e-3, 1e-2, 160));
  EXPECT_TRUE(check_gradient(k, loss, g.k, 1e-3, 1e-3, 1e-2, 80));
}

TEST(RopeQk, TapeGradientsSameAsSeparateRope) {
  for (DType dt : {DType::f32, DType::bf16}) expect_tape_same_as_separate(dt, Device::cpu(), 6, 4, 2, 16);
}

TEST(RopeQk, MismatchedQkThrow) {
  const Tensor q = Tensor::zeros({1, 4, 4, 8}, DType::f32);
  EXPECT_THROW(rope_forward_qk(q, Tensor::zeros({1, 5, 2, 8}, DType::f32), 10000.0f), Error);   // T
  EXPECT_THROW(rope_forward_qk(q, Tensor::zeros({1, 4, 2, 16}, DType::f32), 10000.0f), Error);  // D
  EXPECT_THROW(rope_forward_qk(q, Tensor::zeros({2, 4, 2, 8}, DType::f32), 10000.0f), Error);   // B
  EXPECT_THROW(rope_forward_qk(q, Tensor::zeros({1, 4, 2, 8}, DType::bf16), 10000.0f), Error);  // dtype
  EXPECT_THROW(rope_backward_qk(q, Tensor::zeros({1, 4, 8}, DType::f32), 10000.0f), Error);     // not 4-D
}

// ---------------------------------------------------------------------------------------------
// CUDA: one launch for q and k must give the bits of two launches; CUDA vs CPU with test_rope's
// tolerances (f32 atol 1e-6 rtol 1e-6; bf16 atol 4e-3 rtol 8e-3: expected bitwise, room for a
// 1-ulp difference of the device's double sincos).

TEST(RopeQkCuda, SameBitsAsSeparateCalls) {
  OMNIQ_REQUIRE_CUDA();
  for (const QkCase& c : kCases)
    for (DType dt : {DType::f32, DType::bf16}) expect_same_as_separate(c, dt, Device::cuda());
  // The LLaMA-7B step's shape (MHA) and a GQA one of the same size.
  expect_same_as_separate({1, 2048, 32, 32, 128, 0, 10000.0f}, DType::bf16, Device::cuda());
  expect_same_as_separate({1, 2048, 32, 8, 128, 0, 500000.0f}, DType::bf16, Device::cuda());
}

TEST(RopeQkCuda, MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const QkCase& c : kCases)
    for (DType dt : {DType::f32, DType::bf16}) {
      const float atol = dt == DType::bf16 ? 4e-3f : 1e-6f, rtol = dt == DType::bf16 ? 8e-3f : 1e-6f;
      Tensor q = Tensor::uniform({c.B, c.T, c.Hq, c.D}, -1, 1, 21, dt);
      Tensor k = Tensor::uniform({c.B, c.T, c.Hk, c.D}, -1, 1, 22, dt);
      const Tensor qg = q.to(Device::cuda()), kg = k.to(Device::cuda());
      RopeQk want = rope_forward_qk(q, k, c.theta, c.off), got = rope_forward_qk(qg, kg, c.theta, c.off);
      EXPECT_TRUE(all_close(got.q, want.q, atol, rtol)) << dtype_name(dt) << " D" << c.D;
      EXPECT_TRUE(all_close(got.k, want.k, atol, rtol)) << dtype_name(dt) << " D" << c.D;
      RopeQk bw = rope_backward_qk(q, k, c.theta, c.off), bg = rope_backward_qk(qg, kg, c.theta, c.off);
      EXPECT_TRUE(all_close(bg.q, bw.q, atol, rtol)) << "backward " << dtype_name(dt) << " D" << c.D;
      EXPECT_TRUE(all_close(bg.k, bw.k, atol, rtol)) << "backward " << dtype_name(dt) << " D" << c.D;
    }
}

// A view that is not 16-byte aligned (D/2 = 8 would otherwise take the one-launch kernel) takes
// the two-call fallback: still the same bits.
TEST(RopeQkCuda, UnalignedViewFallsBackWithSameBits) {
  OMNIQ_REQUIRE_CUDA();
  Tensor flat = Tensor::uniform({9, 4}, -1, 1, 33, DType::bf16, Device::cuda());  // rows of 8 bytes
  Tensor k_view = flat.view_rows(1, 8).reshape({1, 2, 1, 16});                   // starts 8 bytes in
  Tensor q = Tensor::uniform({1, 2, 3, 16}, -1, 1, 34, DType::bf16, Device::cuda());
  RopeQk f = rope_forward_qk(q, k_view, 10000.0f, 3);
  EXPECT_TRUE(same_bits(f.q, rope_forward(q, 10000.0f, 3)));
  EXPECT_TRUE(same_bits(f.k, rope_forward(k_view, 10000.0f, 3)));
  RopeQk b = rope_backward_qk(k_view, q, 10000.0f, 3);  // unaligned first operand too
  EXPECT_TRUE(same_bits(b.q, rope_backward(k_view, 10000.0f, 3)));
  EXPECT_TRUE(same_bits(b.k, rope_backward(q, 10000.0f, 3)));
}

TEST(RopeQkCuda, TapeGradientsSameAsSeparateRope) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16}) expect_tape_same_as_separate(dt, Device::cuda(), 40, 8, 2, 128);
}
