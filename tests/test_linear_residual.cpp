// The GEMM fusions of ops/matmul.h: a residual added in the Linear's epilogue
// (linear_forward(x, w, b, residual)) and dX accumulated by the GEMM into an existing buffer
// (linear_backward_dx_accumulate), plus ag::linear_residual. CPU against naive double loops,
// finite differences on CPU, rounding-once checks that tell the fused path from the unfused one,
// and CUDA (cuBLASLt: C input != D output, beta = 1) against the CPU.
#include <cmath>
#include <vector>

#include "autograd/functions.h"
#include "ops/matmul.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::all_close;
using test::check_gradient;

// Sets the fusion switch for one scope and restores it (the switch is process-global).
struct FusionScope {
  unsigned before;
  explicit FusionScope(bool on) : before(ag::gemm_fusion_parts()) { ag::set_gemm_fusion_enabled(on); }
  ~FusionScope() { ag::set_gemm_fusion_parts(before); }
};

Shape with_last(Shape s, int64_t n) {
  s.dims[s.ndim - 1] = n;
  return s;
}

// y = x·wᵀ + b + r in double, from the tensors' stored values.
std::vector<float> naive_linear_residual(const Tensor& x, const Tensor& w, const Tensor* b, const Tensor* r) {
  const int64_t R = x.rows(), K = x.cols(), N = w.size(0);
  const auto xv = x.to_f32_vector(), wv = w.to_f32_vector();
  const auto bv = b ? b->to_f32_vector() : std::vector<float>(), rv = r ? r->to_f32_vector() : std::vector<float>();
  std::vector<float> y(static_cast<size_t>(R * N));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t n = 0; n < N; ++n) {
      double s = (b ? bv[n] : 0.0) + (r ? rv[i * N + n] : 0.0);
      for (int64_t k = 0; k < K; ++k) s += static_cast<double>(xv[i * K + k]) * wv[n * K + k];
      y[i * N + n] = static_cast<float>(s);
    }
  return y;
}

// dx_old + dy·w in double.
std::vector<float> naive_dx_accumulate(const Tensor& dy, const Tensor& w, const Tensor& dx_old) {
  const int64_t R = dy.rows(), N = dy.cols(), K = w.size(1);
  const auto dyv = dy.to_f32_vector(), wv = w.to_f32_vector(), ov = dx_old.to_f32_vector();
  std::vector<float> out(static_cast<size_t>(R * K));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t k = 0; k < K; ++k) {
      double s = ov[i * K + k];
      for (int64_t n = 0; n < N; ++n) s += static_cast<double>(dyv[i * N + n]) * wv[n * K + k];
      out[i * K + k] = static_cast<float>(s);
    }
  return out;
}

// Rounds fp32 values to dt as a tensor of dt would store them.
std::vector<float> rounded(const std::vector<float>& v, DType dt) {
  return Tensor::from_f32(v, Shape{static_cast<int64_t>(v.size())}, dt).to_f32_vector();
}

struct Case {
  Shape x;
  int64_t N;
};
const std::vector<Case> kCases = {{Shape{37, 29}, 53}, {Shape{4, 9, 29}, 53}, {Shape{2, 3, 16, 64}, 96},
                                  {Shape{256, 384}, 512}};

// ---------------------------------------------------------------------------------------------
// CPU reference

TEST(LinearResidual, CpuForwardMatchesNaive) {
  for (DType dt : {DType::f32, DType::bf16})
    for (const Case& c : kCases)
      for (bool bias : {false, true}) {
        SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N << " bias=" << bias);
        const int64_t K = c.x.dims[c.x.ndim - 1];
        Tensor x = Tensor::uniform(c.x, -1, 1, 1, dt), w = Tensor::uniform({c.N, K}, -1, 1, 2, dt);
        Tensor b = Tensor::uniform({c.N}, -1, 1, 3, dt), r = Tensor::uniform(with_last(c.x, c.N), -4, 4, 4, dt);
        Tensor y = linear_forward(x, w, bias ? &b : nullptr, &r);
        ASSERT_EQ(y.shape(), r.shape());
        ASSERT_EQ(y.dtype(), dt);
        const auto ref = naive_linear_residual(x, w, bias ? &b : nullptr, &r);
        // f32: fp32 sum vs double, ~1e-6 relative. bf16: one rounding of the same fp32 sum, so the
        // result is the double reference rounded to bf16 up to one ulp (the fp32 sum may sit on the
        // other side of a tie): atol 1e-2 (|y| <= ~35) rtol 8e-3.
        if (dt == DType::f32) EXPECT_TRUE(all_close(y.to_f32_vector(), ref, 1e-5f, 1e-5f));
        else EXPECT_TRUE(all_close(y.to_f32_vector(), rounded(ref, dt), 1e-2f, 8e-3f));
      }
}

TEST(LinearResidual, CpuF32EqualsLinearThenAddBitwise) {
  // The CPU reference adds b then r in fp32 after the same GEMM: bitwise the unfused f32 result.
  Tensor x = Tensor::uniform({3, 5, 24}, -1, 1, 11), w = Tensor::uniform({40, 24}, -1, 1, 12);
  Tensor b = Tensor::uniform({40}, -1, 1, 13), r = Tensor::uniform({3, 5, 40}, -1, 1, 14);
  Tensor y = linear_forward(x, w, &b, &r);
  Tensor y0 = add(r, linear_forward(x, w, &b));
  EXPECT_TRUE(all_close(y, y0, 0, 0));
}

TEST(LinearResidual, CpuDxAccumulateMatchesNaive) {
  for (DType dt : {DType::f32, DType::bf16})
    for (const Case& c : kCases) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N);
      const int64_t K = c.x.dims[c.x.ndim - 1];
      Tensor w = Tensor::uniform({c.N, K}, -1, 1, 21, dt), dy = Tensor::uniform(with_last(c.x, c.N), -1, 1, 22, dt);
      Tensor dx = Tensor::uniform(c.x, -3, 3, 23, dt);
      const Tensor old = dx.clone();
      linear_backward_dx_accumulate(dy, w, dx);
      const auto ref = naive_dx_accumulate(dy, w, old);
      if (dt == DType::f32) EXPECT_TRUE(all_close(dx.to_f32_vector(), ref, 1e-5f, 1e-5f));
      else EXPECT_TRUE(all_close(dx.to_f32_vector(), rounded(ref, dt), 1e-2f, 8e-3f));  // see CpuForwardMatchesNaive
    }
}

TEST(LinearResidual, CpuDxAccumulateF32EqualsFreshDxThenAddBitwise) {
  Tensor x = Tensor::uniform({6, 7, 33}, -1, 1, 31), w = Tensor::uniform({19, 33}, -1, 1, 32);
  Tensor dy = Tensor::uniform({6, 7, 19}, -1, 1, 33), dx = Tensor::uniform({6, 7, 33}, -1, 1, 34);
  Tensor want = dx.clone();
  add_inplace(want, linear_backward(dy, x, w, true, false, false).dx);
  linear_backward_dx_accumulate(dy, w, dx);
  EXPECT_TRUE(all_close(dx, want, 0, 0));
}

TEST(LinearResidual, BadArgumentsThrow) {
  Tensor x = Tensor::uniform({4, 8}, -1, 1, 1), w = Tensor::uniform({6, 8}, -1, 1, 2);
  Tensor r_bad_shape = Tensor::zeros({4, 5}, DType::f32), r_bad_rows = Tensor::zeros({3, 6}, DType::f32);
  Tensor r_bf16 = Tensor::zeros({4, 6}, DType::bf16), r_3d = Tensor::zeros({2, 2, 6}, DType::f32);
  EXPECT_THROW(linear_forward(x, w, nullptr, &r_bad_shape), Error);
  EXPECT_THROW(linear_forward(x, w, nullptr, &r_bad_rows), Error);
  EXPECT_THROW(linear_forward(x, w, nullptr, &r_bf16), Error);
  EXPECT_THROW(linear_forward(x, w, nullptr, &r_3d), Error);  // same numel, not the output's shape
  Tensor dy = Tensor::uniform({4, 6}, -1, 1, 3), dx = Tensor::zeros({4, 8}, DType::f32);
  Tensor dx_rows = Tensor::zeros({5, 8}, DType::f32), dx_bf16 = Tensor::zeros({4, 8}, DType::bf16);
  EXPECT_THROW(linear_backward_dx_accumulate(dy, w, dx_rows), Error);
  EXPECT_THROW(linear_backward_dx_accumulate(dy, w, dx_bf16), Error);
  EXPECT_THROW(linear_backward_dx_accumulate(dy, x, dx), Error);  // w [4, 8]: dy has 6 columns
  Tensor both = Tensor::zeros({2, 4, 8}, DType::f32);             // dx and dy views of one storage
  Tensor dy_alias = both.view_rows(0, 1).reshape({4, 8}), dx_alias = both.view_rows(1, 1).reshape({4, 8});
  Tensor w_sq = Tensor::uniform({8, 8}, -1, 1, 4);
  EXPECT_THROW(linear_backward_dx_accumulate(dy_alias, w_sq, dx_alias), Error);
}

// ---------------------------------------------------------------------------------------------
// autograd: finite differences and rounding once

// loss = Σ y ⊙ c in double.
double weighted_sum(const Tensor& y, const Tensor& c) {
  const auto yv = y.to_f32_vector(), cv = c.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < yv.size(); ++i) s += static_cast<double>(yv[i]) * cv[i];
  return s;
}

// loss = Σ y ⊙ c as a graph: [1, n] · [1, n]ᵀ -> [1, 1] -> [1] (its dy for y is exactly c).
ag::Var weighted_sum(ag::Tape& t, const ag::Var& y, const Tensor& c) {
  const int64_t n = y->value.numel();
  ag::Var flat = ag::reshape(t, y, {1, n});
  return ag::reshape(t, ag::linear(t, flat, ag::constant(c.reshape({1, n}))), {1});
}

TEST(LinearResidual, AutogradGradientsMatchFiniteDifferences) {
  for (bool with_bias : {false, true}) {
    SCOPED_TRACE(testing::Message() << "bias=" << with_bias);
    FusionScope fused(true);
    ag::Var x = ag::parameter(Tensor::uniform({2, 3, 7}, -1, 1, 41), "x");
    ag::Var w = ag::parameter(Tensor::uniform({5, 7}, -1, 1, 42), "w");
    ag::Var b = with_bias ? ag::parameter(Tensor::uniform({5}, -1, 1, 43), "b") : nullptr;
    ag::Var r = ag::parameter(Tensor::uniform({2, 3, 5}, -1, 1, 44), "r");
    Tensor c = Tensor::uniform({2, 3, 5}, -1, 1, 45);
    ag::Tape t;
    ag::Var y = ag::linear_residual(t, x, w, b, r);
    EXPECT_EQ(t.size(), 1u);  // one node: the add lives in the GEMM
    t.backward(weighted_sum(t, y, c));
    auto f = [&] { return weighted_sum(linear_forward(x->value, w->value, b ? &b->value : nullptr, &r->value), c); };
    EXPECT_TRUE(check_gradient(x->value, f, x->grad, 1e-2, 1e-4, 1e-3));
    EXPECT_TRUE(check_gradient(w->value, f, w->grad, 1e-2, 1e-4, 1e-3));
    EXPECT_TRUE(check_gradient(r->value, f, r->grad, 1e-2, 1e-4, 1e-3));
    if (b) EXPECT_TRUE(check_gradient(b->value, f, b->grad, 1e-2, 1e-4, 1e-3));
  }
}

// A bf16 leaf that takes a bf16 gradient (an activation, not a parameter).
ag::Var bf16_leaf(const std::vector<float>& v, const Shape& s) {
  ag::Var x = ag::constant(Tensor::from_f32(v, s, DType::bf16));
  x->requires_grad = true;
  return x;
}

// The fused paths round once where the unfused ones round twice. With r = 1 and x·wᵀ = 2⁻⁸ + 2⁻¹⁸
// (exact in fp32; 2⁻⁸ in bf16), one rounding of 1 + 2⁻⁸ + 2⁻¹⁸ gives 1 + 2⁻⁷ (above the half-ulp tie),
// while rounding x·wᵀ first lands on the tie 1 + 2⁻⁸, which rounds to even: 1. So these values tell
// which path ran; the unfused values confirm the switch restores the old graph.
TEST(LinearResidual, FusedPathsRoundOnceInBf16) {
  const float two_m8 = std::ldexp(1.0f, -8), two_m18 = std::ldexp(1.0f, -18);
  for (bool on : {true, false}) {
    SCOPED_TRACE(testing::Message() << "fusion=" << on);
    FusionScope scope(on);
    const float want = on ? 1.0f + std::ldexp(1.0f, -7) : 1.0f;
    {  // forward: y = r + x·wᵀ, x = [1, 1], w = [[2⁻⁸, 2⁻¹⁸]]ᵀ... as [N=1, K=2] with x = [1, 1]
      ag::Tape t;
      ag::Var x = bf16_leaf({1.0f, 1.0f}, {1, 2});
      ag::Var w = ag::constant(Tensor::from_f32({two_m8, two_m18}, {1, 2}, DType::bf16));
      ag::Var r = bf16_leaf({1.0f}, {1, 1});
      ag::Var y = ag::linear_residual(t, x, w, nullptr, r);
      EXPECT_EQ(y->value.to_f32_vector()[0], want);
      EXPECT_EQ(t.size(), on ? 1u : 2u);
    }
    {  // backward: x feeds linears A and B; B (recorded later) runs first and creates x.grad = 1,
       // then A adds dy_A·W_A = 1·2⁻⁸ + 1·2⁻¹⁸ into it.
      ag::Tape t;
      ag::Var x = bf16_leaf({0.5f}, {1, 1});
      ag::Var wa = ag::constant(Tensor::from_f32({two_m8, two_m18}, {2, 1}, DType::bf16));
      ag::Var wb = ag::constant(Tensor::from_f32({1.0f, 0.0f}, {2, 1}, DType::bf16));
      ag::Var ya = ag::linear(t, x, wa), yb = ag::linear(t, x, wb);
      ag::Var loss = ag::add(t, weighted_sum(t, ya, Tensor::from_f32({1, 1}, {2}, DType::bf16)),
                             weighted_sum(t, yb, Tensor::from_f32({1, 0}, {2}, DType::bf16)));
      t.backward(loss);
      ASSERT_EQ(x->grad.dtype(), DType::bf16);
      EXPECT_EQ(x->grad.to_f32_vector()[0], want);
    }
  }
}

TEST(LinearResidual, ResidualGradientIsDyWithoutACopy) {
  // The residual's gradient is the output's gradient itself (a view of dy: no copy kernel).
  FusionScope fused(true);
  ag::Var x = ag::parameter(Tensor::uniform({4, 6}, -1, 1, 51), "x");
  ag::Var w = ag::constant(Tensor::uniform({3, 6}, -1, 1, 52));
  ag::Var r = ag::constant(Tensor::uniform({4, 3}, -1, 1, 53));
  r->requires_grad = true;  // an f32 activation: keeps dy's storage
  ag::Tape t;
  ag::Var y = ag::linear_residual(t, x, w, nullptr, r);
  const void* handed = nullptr;
  ag::Var z = ag::constant(y->value.alias());
  t.record({y}, z, [y, &handed](const Tensor& dy) {
    Tensor g = dy.clone();
    handed = g.data();
    ag::accumulate_grad(*y, std::move(g));
  });
  Tensor c = Tensor::uniform({4, 3}, -1, 1, 54);
  t.backward(weighted_sum(t, z, c));
  EXPECT_EQ(r->grad.data(), handed);
  EXPECT_TRUE(all_close(r->grad, c, 0, 0));
}

TEST(LinearResidual, InputThatIsAlsoTheResidual) {
  // y = x + x·Wᵀ with x also read by another Linear first: x's gradient is created by one node,
  // accumulated by the GEMM (β = 1) of the next, and dy is added last. Equal to the unfused graph.
  auto grads = [](bool fused) {
    FusionScope scope(fused);
    ag::Var x = ag::parameter(Tensor::uniform({3, 4, 12}, -1, 1, 55), "x");
    ag::Var w = ag::parameter(Tensor::uniform({12, 12}, -1, 1, 56), "w");
    ag::Var v = ag::parameter(Tensor::uniform({12, 12}, -1, 1, 57), "v");
    ag::Tape t;
    ag::Var y = ag::mul(t, ag::linear_residual(t, x, w, nullptr, x), ag::linear(t, x, v));
    t.backward(weighted_sum(t, y, Tensor::uniform({3, 4, 12}, -1, 1, 58)));
    std::vector<Tensor> g;
    for (const ag::Var& p : {x, w, v}) g.push_back(std::move(p->grad));
    return g;
  };
  std::vector<Tensor> fused = grads(true), plain = grads(false);
  for (size_t i = 0; i < fused.size(); ++i) EXPECT_TRUE(all_close(fused[i], plain[i], 1e-6f, 1e-5f)) << i;
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

// f32: atol 1e-4 rtol 1e-4 (fp32 sums in another order, K up to 384, |y| <= ~30). bf16/f16: CPU
// of the same (already rounded) inputs, both one rounding of an fp32 sum: within ~1 ulp, rtol 2e-2.
void check_forward_cuda(DType dt, const Case& c, bool bias, bool offset_residual) {
  SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N << " bias=" << bias
                                  << " offset_residual=" << offset_residual);
  const int64_t K = c.x.dims[c.x.ndim - 1];
  Tensor x = Tensor::uniform(c.x, -1, 1, 61, dt), w = Tensor::uniform({c.N, K}, -1, 1, 62, dt);
  Tensor b = Tensor::uniform({c.N}, -1, 1, 63, dt);
  const Shape ys = with_last(c.x, c.N);
  Tensor r = Tensor::uniform(ys, -4, 4, 64, dt);
  Tensor ref = linear_forward(x, w, bias ? &b : nullptr, &r);
  Tensor xd = x.to(Device::cuda()), wd = w.to(Device::cuda()), bd = b.to(Device::cuda());
  // A residual view one row into a larger buffer: C's alignment differs from D's (own plan keys).
  Tensor r_big = Tensor::zeros(Shape{ys.numel() / c.N + 1, c.N}, dt, Device::cuda());
  Tensor rd = offset_residual ? r_big.view_rows(1, ys.numel() / c.N).reshape(ys) : r.to(Device::cuda());
  if (offset_residual) rd.copy_from(r);
  Tensor got = linear_forward(xd, wd, bias ? &bd : nullptr, &rd);
  ASSERT_EQ(got.shape(), ys);
  const float atol = dt == DType::f32 ? 1e-4f : 3e-2f, rtol = dt == DType::f32 ? 1e-4f : 2e-2f;
  EXPECT_TRUE(all_close(got.to(Device::cpu()), ref, atol, rtol));
  EXPECT_TRUE(all_close(rd.to(Device::cpu()), r, 0, 0)) << "the residual (cuBLASLt's C) must stay unchanged";
}

TEST(LinearResidualCuda, ForwardMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (const Case& c : kCases)
      for (bool bias : {false, true})
        for (bool offset : {false, true}) check_forward_cuda(dt, c, bias, offset);
}

TEST(LinearResidualCuda, ForwardWithoutResidualUnchangedAfterResidualCalls) {
  // The plan cache keys beta and the C/D alignment: a plain Linear of the same shape after a
  // residual one must not pick up beta = 1 (it would add garbage from y's fresh memory).
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor x = Tensor::uniform({64, 96}, -1, 1, 71, dt), w = Tensor::uniform({80, 96}, -1, 1, 72, dt);
    Tensor r = Tensor::uniform({64, 80}, -1, 1, 73, dt);
    Tensor xd = x.to(Device::cuda()), wd = w.to(Device::cuda()), rd = r.to(Device::cuda());
    for (int i = 0; i < 3; ++i) {
      Tensor y1 = linear_forward(xd, wd, nullptr, &rd);
      Tensor y0 = linear_forward(xd, wd);
      const float tol = dt == DType::f32 ? 1e-4f : 3e-2f;
      EXPECT_TRUE(all_close(y0.to(Device::cpu()), linear_forward(x, w), tol, tol));
      EXPECT_TRUE(all_close(y1.to(Device::cpu()), linear_forward(x, w, nullptr, &r), tol, tol));
    }
  }
}

TEST(LinearResidualCuda, DxAccumulateMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Case& c : kCases) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N);
      const int64_t K = c.x.dims[c.x.ndim - 1];
      Tensor w = Tensor::uniform({c.N, K}, -1, 1, 81, dt), dy = Tensor::uniform(with_last(c.x, c.N), -1, 1, 82, dt);
      Tensor dx = Tensor::uniform(c.x, -3, 3, 83, dt);
      Tensor dxd = dx.to(Device::cuda());
      linear_backward_dx_accumulate(dy.to(Device::cuda()), w.to(Device::cuda()), dxd);
      linear_backward_dx_accumulate(dy, w, dx);
      const float atol = dt == DType::f32 ? 1e-4f : 3e-2f, rtol = dt == DType::f32 ? 1e-4f : 2e-2f;
      EXPECT_TRUE(all_close(dxd.to(Device::cpu()), dx, atol, rtol));
    }
}

TEST(LinearResidualCuda, FusedPathsRoundOnceInBf16) {
  // As the CPU test: the CUDA epilogue and the beta = 1 GEMM round the fp32 sum once.
  OMNIQ_REQUIRE_CUDA();
  FusionScope fused(true);
  const float two_m8 = std::ldexp(1.0f, -8), two_m18 = std::ldexp(1.0f, -18);
  const float want = 1.0f + std::ldexp(1.0f, -7);
  Device d = Device::cuda();
  Tensor x = Tensor::from_f32({1.0f, 1.0f}, {1, 2}, DType::bf16, d);
  Tensor w = Tensor::from_f32({two_m8, two_m18}, {1, 2}, DType::bf16, d);
  Tensor r = Tensor::from_f32({1.0f}, {1, 1}, DType::bf16, d);
  EXPECT_EQ(linear_forward(x, w, nullptr, &r).to_f32_vector()[0], want);
  Tensor dy = Tensor::from_f32({1.0f, 1.0f}, {1, 2}, DType::bf16, d);
  Tensor wt = Tensor::from_f32({two_m8, two_m18}, {2, 1}, DType::bf16, d);
  Tensor dx = Tensor::from_f32({1.0f}, {1, 1}, DType::bf16, d);
  linear_backward_dx_accumulate(dy, wt, dx);
  EXPECT_EQ(dx.to_f32_vector()[0], want);
}

TEST(LinearResidualCuda, AutogradMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  FusionScope fused(true);
  auto run = [](Device d, std::vector<Tensor>& grads) {
    ag::Var x = ag::parameter(Tensor::uniform({2, 9, 48}, -1, 1, 91).to(d), "x");
    ag::Var w1 = ag::parameter(Tensor::uniform({32, 48}, -1, 1, 92).to(d), "w1");
    ag::Var w2 = ag::parameter(Tensor::uniform({32, 48}, -1, 1, 93).to(d), "w2");
    ag::Var b = ag::parameter(Tensor::uniform({32}, -1, 1, 94).to(d), "b");
    ag::Var r = ag::parameter(Tensor::uniform({2, 9, 32}, -1, 1, 95).to(d), "r");
    ag::Tape t;
    // x feeds two Linears (dx accumulated by the second GEMM); one adds r in its epilogue.
    ag::Var y = ag::mul(t, ag::linear_residual(t, x, w1, b, r), ag::linear(t, x, w2));
    t.backward(weighted_sum(t, y, Tensor::uniform({2, 9, 32}, -1, 1, 96).to(d)));
    for (ag::Var v : {x, w1, w2, b, r}) grads.push_back(v->grad.to(Device::cpu()));
  };
  std::vector<Tensor> ref, got;
  run(Device::cpu(), ref);
  run(Device::cuda(), got);
  // f32 both sides, other summation orders (K = 48, products of two Linears): 1e-4 / 1e-3.
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(all_close(got[i], ref[i], 1e-4f, 1e-3f)) << "grad " << i;
}

}  // namespace
}  // namespace omniq
