// Activations: CPU values vs double-precision formulas, finite-difference checks of the backward
// passes, and CUDA vs CPU in f32 and bf16.
#include <cmath>
#include <vector>

#include "ops/activation.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

double silu(double g) { return g / (1.0 + std::exp(-g)); }

double weighted_sum(const Tensor& y, const std::vector<float>& w) {
  std::vector<float> v = y.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += static_cast<double>(v[i]) * w[i];
  return s;
}

// Values in [-4, 4] with every |x| < 0.05 pushed out to 0.05 (relu's kink is not differentiable).
Tensor away_from_zero(const Shape& s, uint64_t seed) {
  std::vector<float> v = Tensor::uniform(s, -4, 4, seed).to_f32_vector();
  for (float& x : v)
    if (std::fabs(x) < 0.05f) x = x < 0 ? -0.05f : 0.05f;
  return Tensor::from_f32(v, s);
}

}  // namespace

TEST(Activation, SwigluMatchesFormula) {
  Tensor g = Tensor::uniform({5, 9}, -6, 6, 1), u = Tensor::uniform({5, 9}, -2, 2, 2);
  std::vector<float> vg = g.to_f32_vector(), vu = u.to_f32_vector(), vy = swiglu_forward(g, u).to_f32_vector();
  for (size_t i = 0; i < vg.size(); ++i) EXPECT_NEAR(vy[i], silu(vg[i]) * vu[i], 1e-6 + 1e-6 * std::fabs(vy[i])) << i;
  // Saturation: very negative gates give 0, not NaN (e^-g overflows to inf).
  Tensor big = Tensor::from_f32({-200.0f, 200.0f}, {2}), one = Tensor::from_f32({1.0f, 1.0f}, {2});
  std::vector<float> sat = swiglu_forward(big, one).to_f32_vector();
  EXPECT_EQ(sat[0], 0.0f);
  EXPECT_EQ(sat[1], 200.0f);
  SwigluGrads sg = swiglu_backward(one, big, one);
  for (float v : sg.dgate.to_f32_vector()) EXPECT_FALSE(std::isnan(v));
  EXPECT_THROW(swiglu_forward(g, Tensor::zeros({5, 8}, DType::f32)), Error);
}

TEST(Activation, SwigluBackwardMatchesFiniteDifferences) {
  Tensor g = Tensor::uniform({4, 7}, -4, 4, 3), u = Tensor::uniform({4, 7}, -2, 2, 4);
  Tensor w = Tensor::uniform({4, 7}, -1, 1, 5);
  std::vector<float> vw = w.to_f32_vector();
  SwigluGrads grads = swiglu_backward(w, g, u);
  auto loss = [&] { return weighted_sum(swiglu_forward(g, u), vw); };
  EXPECT_TRUE(check_gradient(g, loss, grads.dgate, 1e-3, 1e-3, 1e-2));
  EXPECT_TRUE(check_gradient(u, loss, grads.dup, 1e-3, 1e-3, 1e-2));
}

TEST(Activation, ReluValuesGradientsAndNan) {
  Tensor x = Tensor::from_f32({-2.0f, -0.0f, 0.0f, 0.5f, 3.0f, NAN}, {6});
  std::vector<float> y = relu_forward(x).to_f32_vector();
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[2], 0.0f);
  EXPECT_EQ(y[3], 0.5f);
  EXPECT_EQ(y[4], 3.0f);
  EXPECT_TRUE(std::isnan(y[5]));  // as torch.relu
  Tensor dy = Tensor::full({6}, 2.0f, DType::f32);
  std::vector<float> dx = relu_backward(dy, x).to_f32_vector();
  EXPECT_EQ(dx, (std::vector<float>{0, 0, 0, 2, 2, 2}));  // 0 at x <= 0; NaN is not <= 0 (threshold_backward)

  Tensor xs = away_from_zero({5, 8}, 6), w = Tensor::uniform({5, 8}, -1, 1, 7);
  std::vector<float> vw = w.to_f32_vector();
  Tensor grad = relu_backward(w, xs);
  auto loss = [&] { return weighted_sum(relu_forward(xs), vw); };
  EXPECT_TRUE(check_gradient(xs, loss, grad, 1e-3, 1e-3, 1e-3));
}

TEST(Activation, Bf16InputsRoundOnceAtTheEnd) {
  Tensor g = Tensor::uniform({3, 5}, -3, 3, 8, DType::bf16), u = Tensor::uniform({3, 5}, -3, 3, 9, DType::bf16);
  Tensor y = swiglu_forward(g, u);
  EXPECT_EQ(y.dtype(), DType::bf16);
  std::vector<float> vg = g.to_f32_vector(), vu = u.to_f32_vector(), vy = y.to_f32_vector();
  for (size_t i = 0; i < vg.size(); ++i) {
    float ref = round_bf16(static_cast<float>(silu(vg[i]) * vu[i]));
    EXPECT_NEAR(vy[i], ref, 8e-3 * std::fabs(ref) + 1e-6) << i;  // at most one bf16 ulp
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU on the same inputs. f32: CUDA expf vs the host's expf differ by an ulp or two, so
// atol 1e-6, rtol 1e-5. bf16: both round the fp32 result once, so they agree up to one bf16 ulp where
// the fp32 values straddle a rounding boundary: atol 1e-6, rtol 8e-3. relu is exact (rtol 0).

namespace {
struct Case {
  int64_t R, C;
};
// Odd (scalar path), aligned (4-wide packs), large (several grid-stride trips).
const Case kCases[] = {{37, 129}, {64, 128}, {2048, 4096}};
float rtol_for(DType dt) { return dt == DType::bf16 ? 8e-3f : 1e-5f; }
}  // namespace

TEST(ActivationCuda, SwigluMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (const Case& cs : kCases) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor g = Tensor::uniform({cs.R, cs.C}, -6, 6, 11, dt), u = Tensor::uniform({cs.R, cs.C}, -2, 2, 12, dt);
      Tensor dy = Tensor::uniform({cs.R, cs.C}, -1, 1, 13, dt);
      Tensor g_gpu = g.to(gpu), u_gpu = u.to(gpu), dy_gpu = dy.to(gpu);
      EXPECT_TRUE(all_close(swiglu_forward(g_gpu, u_gpu), swiglu_forward(g, u), 1e-6f, rtol_for(dt)))
          << cs.R << "x" << cs.C << " " << dtype_name(dt);
      SwigluGrads ref = swiglu_backward(dy, g, u), got = swiglu_backward(dy_gpu, g_gpu, u_gpu);
      EXPECT_EQ(got.dgate.dtype(), dt);
      EXPECT_TRUE(all_close(got.dgate, ref.dgate, 1e-6f, rtol_for(dt))) << "dgate " << cs.R << "x" << cs.C;
      EXPECT_TRUE(all_close(got.dup, ref.dup, 1e-6f, rtol_for(dt))) << "dup " << cs.R << "x" << cs.C;
    }
  }
}

TEST(ActivationCuda, ReluMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (const Case& cs : kCases) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor x = Tensor::uniform({cs.R, cs.C}, -1, 1, 21, dt), dy = Tensor::uniform({cs.R, cs.C}, -1, 1, 22, dt);
      EXPECT_TRUE(all_close(relu_forward(x.to(gpu)), relu_forward(x), 0, 0)) << cs.R << "x" << cs.C;
      EXPECT_TRUE(all_close(relu_backward(dy.to(gpu), x.to(gpu)), relu_backward(dy, x), 0, 0)) << cs.R << "x" << cs.C;
    }
  }
  Tensor x = Tensor::from_f32({-1.0f, 0.0f, 2.0f, NAN, -0.0f}, {5});
  std::vector<float> y = relu_forward(x.to(gpu)).to_f32_vector();
  EXPECT_TRUE(std::isnan(y[3]));
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[2], 2.0f);
}

TEST(ActivationCuda, MisalignedAndMixedDtypeInputs) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  // A view offset by one element cannot use 16-byte packs; the scalar path must give the same values.
  const int64_t n = 4 * 1000;
  Tensor base = Tensor::uniform({n + 1}, -3, 3, 31);
  Tensor g = base.view_rows(1, n), u = Tensor::uniform({n}, -1, 1, 32);
  Tensor g_gpu = base.to(gpu).view_rows(1, n);
  EXPECT_TRUE(all_close(swiglu_forward(g_gpu, u.to(gpu)), swiglu_forward(g, u), 1e-6f, 1e-5f));
  // up in bf16 with an f32 gate: up is converted to f32 first, the result is f32.
  Tensor ub = u.to(DType::bf16);
  Tensor y = swiglu_forward(g_gpu, ub.to(gpu));
  EXPECT_EQ(y.dtype(), DType::f32);
  EXPECT_TRUE(all_close(y, swiglu_forward(g, ub), 1e-6f, 1e-5f));
}
