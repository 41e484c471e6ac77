// Same-shape ag::add / ag::sub (residual adds) hand the output's gradient to an input without a
// copy where that is safe (autograd/functions.cpp, same_shape_add_backward):
//   * one input takes dy's storage itself; the other gets a copy only when the first kept it;
//   * add(x, x) and a gradient that is taken by alias and then receives further in-place
//     accumulations give exactly the gradients of the unaliased formulas;
//   * mixed dtypes (a bf16 activation plus an f32 parameter) convert exactly as before.
// "Probe" nodes (identity ops recorded by hand) report the storage of the gradient they receive.
#include <cmath>
#include <string>

#include "autograd/functions.h"
#include "autograd/quant_functions.h"
#include "ops/loss.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::ag;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

// y = x. The backward records the address of the dy it receives and hands x a fresh copy.
Var probe(Tape& t, const Var& x, const void** seen) {
  Var y = constant(x->value.alias());
  t.record({x}, y, [x, seen](const Tensor& dy) {
    *seen = dy.data();
    accumulate_grad(*x, dy.clone());
  });
  return y;
}

// y = x. The backward hands x a fresh copy of dy and records that copy's address: x's gradient.
Var source(Tape& t, const Var& x, const void** handed) {
  Var y = constant(x->value.alias());
  t.record({x}, y, [x, handed](const Tensor& dy) {
    Tensor g = dy.clone();
    *handed = g.data();
    accumulate_grad(*x, std::move(g));
  });
  return y;
}

Tensor rnd(uint64_t seed, Device dev, DType dt = DType::f32) { return Tensor::uniform({6, 10}, -1, 1, seed, dt, dev); }

// Which inputs of a same-shape add/sub see the output's gradient storage (no copy) and which a copy.
void check_storage_handoff(Device dev) {
  const Tensor target = rnd(9, dev);
  for (BinaryOp op : {BinaryOp::add, BinaryOp::sub}) {
    SCOPED_TRACE(std::string(binary_op_name(op)) + " on " + dev.str());
    Var p = parameter(rnd(1, dev), "p"), q = parameter(rnd(2, dev), "q");
    Var c = constant(rnd(3, dev));
    {  // only a needs a gradient: it gets dy itself
      Tape t;
      const void *seen = nullptr, *handed = nullptr;
      Var s = binary(t, op, probe(t, p, &seen), c);
      t.backward(mse_loss(t, source(t, s, &handed), constant(target.alias())));
      EXPECT_EQ(seen, handed);
    }
    {  // only b: dy itself for add, a fresh -dy for sub
      Tape t;
      const void *seen = nullptr, *handed = nullptr;
      Var s = binary(t, op, c, probe(t, q, &seen));
      t.backward(mse_loss(t, source(t, s, &handed), constant(target.alias())));
      EXPECT_EQ(seen == handed, op == BinaryOp::add);
    }
    {  // both, neither had a gradient yet: a keeps dy, b gets a copy
      Tape t;
      const void *seen_a = nullptr, *seen_b = nullptr, *handed = nullptr;
      Var s = binary(t, op, probe(t, p, &seen_a), probe(t, q, &seen_b));
      t.backward(mse_loss(t, source(t, s, &handed), constant(target.alias())));
      EXPECT_EQ(seen_a, handed);
      EXPECT_NE(seen_b, handed);
    }
  }
  {  // both, a already had a gradient (dy was added into it): b can take dy itself
    Tape t;
    Var p = parameter(rnd(1, dev), "p"), q = parameter(rnd(2, dev), "q");
    const void *seen_b = nullptr, *handed = nullptr, *unused = nullptr;
    Var u = probe(t, p, &unused);
    Var s = add(t, u, probe(t, q, &seen_b));
    Var later = scale(t, u, 0.5f);  // recorded after s: its backward runs first and creates u's gradient
    t.backward(mse_loss(t, add(t, source(t, s, &handed), later), constant(target.alias())));
    EXPECT_EQ(seen_b, handed);
  }
}

// add(x, x) == scale(x, 2) bitwise (dy + dy and 2·dy are the same float), for an f32 parameter
// and a bf16 intermediate.
void check_add_same_var(Device dev) {
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)) + " on " + dev.str());
    Tensor target = rnd(19, dev, dt);
    auto grad_of = [&](bool use_add) {
      Var p = parameter(rnd(11, dev), "p");
      Tape t;
      Var x = cast(t, scale(t, p, 1.5f), dt);  // an intermediate of dtype dt (p itself when f32)
      Var y = use_add ? add(t, x, x) : scale(t, x, 2.0f);
      t.backward(mse_loss(t, y, constant(target.alias())));
      return std::move(p->grad);
    };
    Tensor ref = grad_of(false), got = grad_of(true);
    EXPECT_TRUE(all_close(got, ref, 0, 0));
    // And the parameter itself used twice (its persistent f32 gradient takes dy by alias).
    Var p = parameter(rnd(12, dev), "p");
    Tensor t32 = rnd(13, dev);
    Tape t;
    t.backward(mse_loss(t, add(t, p, p), constant(t32.alias())));
    Tape t2;
    Var p2 = parameter(rnd(12, dev), "p2");
    t2.backward(mse_loss(t2, scale(t2, p2, 2.0f), constant(t32.alias())));
    EXPECT_TRUE(all_close(p->grad, p2->grad, 0, 0));
  }
}

// u's gradient is taken by alias in add(u, v) and afterwards accumulated into in place (by the
// backward of m = u·c, recorded before the add): v must still see the unmodified dy.
//   r = (u + v) + u·c,  u = 2p, v = 3q:  dq = 3·dr,  dp = 2·(dr + dr·c) with dr = dmse/dr.
struct HazardGrads {
  Tensor dp, dq, ref_dp, ref_dq;
};

HazardGrads run_hazard(Device dev) {
  Var p = parameter(rnd(21, dev), "p"), q = parameter(rnd(22, dev), "q");
  Tensor c = rnd(23, dev), target = rnd(24, dev);
  Tape t;
  Var v = scale(t, q, 3.0f);
  Var u = scale(t, p, 2.0f);
  Var m = mul(t, u, constant(c.alias()));
  Var s = add(t, u, v);
  Var r = add(t, s, m);
  Var loss = mse_loss(t, r, constant(target.alias()));
  t.backward(loss);
  Tensor one = Tensor::full({1}, 1.0f, DType::f32, dev);
  Tensor dr = mse_loss_backward(one, r->value, target);
  HazardGrads h;
  h.ref_dq = omniq::scale(dr, 3.0f);
  h.ref_dp = omniq::scale(omniq::add(dr, omniq::mul(dr, c)), 2.0f);
  h.dp = std::move(p->grad);
  h.dq = std::move(q->grad);
  return h;
}

}  // namespace

TEST(AutogradResidual, SameShapeAddHandsOverDyWithoutCopies) { check_storage_handoff(Device::cpu()); }

TEST(AutogradResidual, AddOfAVarWithItselfEqualsScaleByTwo) { check_add_same_var(Device::cpu()); }

TEST(AutogradResidual, AliasedGradientAccumulatedLaterLeavesTheOtherInputIntact) {
  HazardGrads h = run_hazard(Device::cpu());
  EXPECT_TRUE(all_close(h.dq, h.ref_dq, 0, 0)) << "dq";
  EXPECT_TRUE(all_close(h.dp, h.ref_dp, 0, 0)) << "dp";
}

TEST(AutogradResidual, GradientsMatchFiniteDifferences) {
  // A residual chain with reuse, sub on both sides and a bf16-free f32 graph, against FD.
  Var p = parameter(Tensor::uniform({4, 6}, -1, 1, 31), "p"), q = parameter(Tensor::uniform({4, 6}, -1, 1, 32), "q");
  Var c = constant(Tensor::uniform({4, 6}, -1, 1, 33)), tgt = constant(Tensor::uniform({4, 6}, -1, 1, 34));
  auto build = [&](Tape& t) {
    Var h = add(t, p, mul(t, p, c));      // h = p + p·c
    Var k = sub(t, h, q);                 // k = h - q
    Var o = add(t, sub(t, q, k), add(t, k, k));  // o = (q - k) + 2k
    return mse_loss(t, add(t, o, h), tgt);
  };
  Tape t;
  t.backward(build(t));
  auto f = [&] {
    Tape t2;
    return static_cast<double>(build(t2)->value.item());
  };
  EXPECT_TRUE(check_gradient(p->value, f, p->grad, 1e-3, 1e-4, 1e-2));
  EXPECT_TRUE(check_gradient(q->value, f, q->grad, 1e-3, 1e-4, 1e-2));
}

TEST(AutogradResidual, MixedDtypesConvertAsBefore) {
  // bf16 activation + f32 parameter of the same shape: y and dy are bf16; the parameter's f32
  // gradient holds dy's values exactly; sub gives exactly -dy.
  for (BinaryOp op : {BinaryOp::add, BinaryOp::sub}) {
    Var a = parameter(Tensor::uniform({5, 8}, -1, 1, 41), "a");
    Var b = parameter(Tensor::uniform({5, 8}, -1, 1, 42), "b");
    Tensor target = Tensor::uniform({5, 8}, -1, 1, 43, DType::bf16);
    Tape t;
    Var x = cast(t, a, DType::bf16);
    Var y = binary(t, op, x, b);
    ASSERT_EQ(y->value.dtype(), DType::bf16);
    const void* handed = nullptr;
    Var z = source(t, y, &handed);
    t.backward(mse_loss(t, z, constant(target.alias())));
    Tensor dy = mse_loss_backward(Tensor::full({1}, 1.0f, DType::f32), z->value, target);  // bf16
    ASSERT_EQ(b->grad.dtype(), DType::f32);
    Tensor want_b = (op == BinaryOp::sub ? omniq::scale(dy, -1.0f) : dy.clone()).to(DType::f32);
    EXPECT_TRUE(all_close(b->grad, want_b, 0, 0)) << binary_op_name(op);
    EXPECT_TRUE(all_close(a->grad, dy.to(DType::f32), 0, 0)) << binary_op_name(op);
  }
}

TEST(AutogradResidualCuda, SameShapeAddHandsOverDyWithoutCopies) {
  OMNIQ_REQUIRE_CUDA();
  check_storage_handoff(Device::cuda());
}

TEST(AutogradResidualCuda, AddOfAVarWithItselfEqualsScaleByTwo) {
  OMNIQ_REQUIRE_CUDA();
  check_add_same_var(Device::cuda());
}

TEST(AutogradResidualCuda, AliasedGradientAccumulatedLaterMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  HazardGrads g = run_hazard(Device::cuda());
  EXPECT_TRUE(all_close(g.dq, g.ref_dq, 0, 0)) << "dq";
  EXPECT_TRUE(all_close(g.dp, g.ref_dp, 0, 0)) << "dp";
  HazardGrads c = run_hazard(Device::cpu());
  // mse_loss_backward may round differently on the two backends: f32 atol 1e-6 rtol 1e-5.
  EXPECT_TRUE(all_close(g.dq, c.dq, 1e-6f, 1e-5f)) << "dq vs CPU";
  EXPECT_TRUE(all_close(g.dp, c.dp, 1e-6f, 1e-5f)) << "dp vs CPU";
}
