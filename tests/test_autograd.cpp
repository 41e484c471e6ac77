// Autograd: the tape's accumulation rules, and composed computations whose gradients (through
// several ops) must equal finite differences of the whole function.
#include <cmath>

#include "autograd/functions.h"
#include "ops/loss.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::ag;
using omniq::test::check_gradient;

namespace {

// A small two-layer block: y = W2·relu(W1·rmsnorm(x; g) + b1) ; loss = mse(y, target)
struct TwoLayer {
  Var x, g, w1, b1, w2, target;
  Tensor fwd_loss(Tape& tape) {
    Var h = rmsnorm(tape, x, g, 1e-5f);
    Var a = relu(tape, linear(tape, h, w1, b1));
    Var y = linear(tape, a, w2);
    Var loss = mse_loss(tape, y, target);
    Tensor out = loss->value.alias();
    last_loss = loss;
    return out;
  }
  Var last_loss;
};

TwoLayer make_two_layer(Device dev, uint64_t seed) {
  TwoLayer m;
  m.x = constant(Tensor::uniform({6, 16}, -1, 1, seed, DType::f32, dev));
  m.g = parameter(Tensor::uniform({16}, 0.5f, 1.5f, seed + 1, DType::f32, dev), "g");
  m.w1 = parameter(Tensor::uniform({24, 16}, -0.5f, 0.5f, seed + 2, DType::f32, dev), "w1");
  m.b1 = parameter(Tensor::uniform({24}, -0.1f, 0.3f, seed + 3, DType::f32, dev), "b1");
  m.w2 = parameter(Tensor::uniform({8, 24}, -0.5f, 0.5f, seed + 4, DType::f32, dev), "w2");
  m.target = constant(Tensor::uniform({6, 8}, -1, 1, seed + 5, DType::f32, dev));
  return m;
}

}  // namespace

TEST(Autograd, TwoLayerGradientsMatchFiniteDifferences) {
  TwoLayer m = make_two_layer(Device::cpu(), 11);
  Tape tape;
  m.fwd_loss(tape);
  tape.backward(m.last_loss);
  auto f = [&]() {
    Tape t2;
    return static_cast<double>(m.fwd_loss(t2).item());
  };
  for (Var p : {m.g, m.w1, m.b1, m.w2}) {
    ASSERT_TRUE(p->grad.defined()) << p->name;
    EXPECT_TRUE(check_gradient(p->value, f, p->grad, 1e-3, 2e-4, 2e-2)) << p->name;
  }
  // Frozen inputs never get gradient buffers.
  EXPECT_FALSE(m.x->grad.defined());
  EXPECT_FALSE(m.target->grad.defined());
}

TEST(Autograd, ParameterGradientsAccumulateAcrossBackwardCalls) {
  TwoLayer m = make_two_layer(Device::cpu(), 3);
  Tape t1;
  m.fwd_loss(t1);
  t1.backward(m.last_loss);
  std::vector<float> once = m.w1->grad.to_f32_vector();
  Tape t2;
  m.fwd_loss(t2);
  t2.backward(m.last_loss);
  std::vector<float> twice = m.w1->grad.to_f32_vector();
  for (size_t i = 0; i < once.size(); ++i) EXPECT_NEAR(twice[i], 2 * once[i], 1e-6f + 1e-5f * std::fabs(once[i]));
  zero_grad({m.w1});
  EXPECT_EQ(m.w1->grad.to_f32_vector(), std::vector<float>(once.size(), 0.0f));
}

TEST(Autograd, ReusedValueSumsGradients) {
  // loss = mean((p*p + p - t)^2): p is used three times; d/dp must sum all paths.
  Var p = parameter(Tensor::uniform({5}, -1, 1, 7), "p");
  Var tgt = constant(Tensor::uniform({5}, -1, 1, 8));
  auto build = [&](Tape& t) { return mse_loss(t, add(t, mul(t, p, p), p), tgt); };
  Tape tape;
  Var loss = build(tape);
  tape.backward(loss);
  auto f = [&]() {
    Tape t2;
    return static_cast<double>(build(t2)->value.item());
  };
  EXPECT_TRUE(check_gradient(p->value, f, p->grad, 1e-3, 1e-4, 1e-2));
}

TEST(Autograd, NothingRecordedWithoutTrainableInputs) {
  Tape tape;
  Var a = constant(Tensor::uniform({3, 4}, -1, 1, 1));
  Var b = constant(Tensor::uniform({3, 4}, -1, 1, 2));
  Var loss = mse_loss(tape, a, b);
  EXPECT_EQ(tape.size(), 0u);
  EXPECT_THROW(tape.backward(loss), Error);
}

TEST(Autograd, AttentionBlockGradientsMatchFiniteDifferences) {
  // A tiny LLaMA-like attention path: q/k/v projections, RoPE, GQA attention, output projection.
  const int B = 1, T = 5, Hq = 2, Hkv = 1, D = 4, C = Hq * D;
  Var x = constant(Tensor::uniform({B, T, C}, -1, 1, 21));
  Var wq = parameter(Tensor::uniform({Hq * D, C}, -0.5f, 0.5f, 22), "wq");
  Var wk = parameter(Tensor::uniform({Hkv * D, C}, -0.5f, 0.5f, 23), "wk");
  Var wv = parameter(Tensor::uniform({Hkv * D, C}, -0.5f, 0.5f, 24), "wv");
  Var wo = parameter(Tensor::uniform({C, Hq * D}, -0.5f, 0.5f, 25), "wo");
  Var tgt = constant(Tensor::uniform({B, T, C}, -1, 1, 26));
  auto build = [&](Tape& t) {
    Var q = rope(t, reshape(t, linear(t, x, wq), {B, T, Hq, D}), 10000.f);
    Var k = rope(t, reshape(t, linear(t, x, wk), {B, T, Hkv, D}), 10000.f);
    Var v = reshape(t, linear(t, x, wv), {B, T, Hkv, D});
    Var o = reshape(t, attention(t, q, k, v, 1.0f / std::sqrt(float(D))), {B, T, C});
    return mse_loss(t, linear(t, o, wo), tgt);
  };
  Tape tape;
  Var loss = build(tape);
  tape.backward(loss);
  auto f = [&]() {
    Tape t2;
    return static_cast<double>(build(t2)->value.item());
  };
  for (Var p : {wq, wk, wv, wo}) EXPECT_TRUE(check_gradient(p->value, f, p->grad, 1e-3, 2e-4, 2e-2)) << p->name;
}

TEST(AutogradCuda, TwoLayerMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  TwoLayer c = make_two_layer(Device::cpu(), 5);
  TwoLayer g = make_two_layer(Device::cuda(), 5);
  Tape tc, tg;
  Tensor lc = c.fwd_loss(tc);
  Tensor lg = g.fwd_loss(tg);
  tc.backward(c.last_loss);
  tg.backward(g.last_loss);
  EXPECT_NEAR(lc.item(), lg.item(), 1e-5f * std::fabs(lc.item()) + 1e-7f);
  EXPECT_TRUE(test::all_close(g.w1->grad, c.w1->grad, 1e-6f, 1e-4f));
  EXPECT_TRUE(test::all_close(g.g->grad, c.g->grad, 1e-6f, 1e-4f));
  EXPECT_TRUE(test::all_close(g.b1->grad, c.b1->grad, 1e-6f, 1e-4f));
}
