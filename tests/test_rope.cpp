// RoPE: the HF LLaMA convention against a direct double-precision formula, the bf16 rounding of
// cos/sin, the backward as inverse and as gradient, and CUDA vs CPU.
#include <cmath>
#include <vector>

#include "ops/rope.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

// Direct formula in double. hf_angle: take HF's fp32 inv_freq and fp32 angle (what the op must
// reproduce); otherwise inv_freq = theta^(-2i/D) and angle = p * inv_freq in double throughout.
std::vector<float> rope_double(const Tensor& x, double theta, int64_t pos_offset, bool hf_angle) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  std::vector<float> v = x.to_f32_vector(), out(v.size());
  std::vector<float> inv32 = rope_inv_freq(D, static_cast<float>(theta));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const int64_t p = pos_offset + t;
          const double angle = hf_angle ? static_cast<double>(static_cast<float>(p) * inv32[i])
                                        : p * std::pow(theta, -2.0 * i / D);
          const double c = std::cos(angle), s = std::sin(angle);
          const int64_t base = ((b * T + t) * H + h) * D;
          const double x1 = v[base + i], x2 = v[base + i + half];
          out[base + i] = static_cast<float>(x1 * c - x2 * s);
          out[base + i + half] = static_cast<float>(x2 * c + x1 * s);
        }
  return out;
}

double weighted_sum(const Tensor& y, const std::vector<float>& w) {
  std::vector<float> v = y.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += static_cast<double>(v[i]) * w[i];
  return s;
}

}  // namespace

TEST(Rope, InvFreqIsHfFp32) {
  for (float theta : {10000.0f, 500000.0f}) {
    std::vector<float> inv = rope_inv_freq(128, theta);
    ASSERT_EQ(inv.size(), 64u);
    EXPECT_EQ(inv[0], 1.0f);
    for (int i = 0; i < 64; ++i) {
      const double ref = std::pow(static_cast<double>(theta), -2.0 * i / 128);
      EXPECT_NEAR(inv[i], ref, 1e-6 * ref) << i;  // fp32 pow + reciprocal: a few ulp
    }
  }
}

TEST(Rope, F32MatchesDoubleFormula) {
  // Small positions: the fp32 angle is within ~1e-6 of the exact one, so the fully double formula
  // agrees to 1e-5.
  Tensor x = Tensor::uniform({2, 16, 3, 64}, -1, 1, 1);
  EXPECT_TRUE(all_close(rope_forward(x, 10000.0f).to_f32_vector(), rope_double(x, 10000.0, 0, false), 1e-5f, 0));
  // Large positions: HF's angle is fp32 (p * inv_freq rounded), which is off from the exact angle by
  // up to ~p * 2^-24 rad; we reproduce HF, so compare with the double formula on HF's fp32 angle.
  Tensor y = Tensor::uniform({1, 8, 2, 128}, -1, 1, 2);
  EXPECT_TRUE(all_close(rope_forward(y, 500000.0f, 4000).to_f32_vector(), rope_double(y, 500000.0, 4000, true), 1e-5f, 0));
  EXPECT_TRUE(all_close(rope_forward(y, 10000.0f, 4000).to_f32_vector(), rope_double(y, 10000.0, 4000, true), 1e-5f, 0));
  // Position 0 is the identity.
  Tensor z = Tensor::uniform({1, 1, 4, 32}, -1, 1, 3);
  EXPECT_TRUE(all_close(rope_forward(z, 10000.0f), z, 0, 0));
}

TEST(Rope, Bf16RoundsCosSinLikeHf) {
  Tensor x = Tensor::uniform({1, 6, 2, 16}, -1, 1, 4, DType::bf16);
  const int64_t T = 6, H = 2, D = 16, half = 8, off = 100;
  std::vector<float> v = x.to_f32_vector(), got = rope_forward(x, 10000.0f, off).to_f32_vector();
  std::vector<float> inv = rope_inv_freq(D, 10000.0f);
  int differs_from_unrounded = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(off + t) * inv[i];
        const float c32 = static_cast<float>(std::cos(static_cast<double>(angle)));
        const float s32 = static_cast<float>(std::sin(static_cast<double>(angle)));
        const float c = round_bf16(c32), s = round_bf16(s32);  // cos.to(bf16), sin.to(bf16)
        const int64_t base = (t * H + h) * D;
        const float x1 = v[base + i], x2 = v[base + i + half];
        EXPECT_EQ(got[base + i], round_bf16(x1 * c - x2 * s));
        EXPECT_EQ(got[base + i + half], round_bf16(x2 * c + x1 * s));
        differs_from_unrounded += got[base + i] != round_bf16(x1 * c32 - x2 * s32);
      }
  EXPECT_GT(differs_from_unrounded, 0);  // the rounding of cos/sin is observable, so it is really done
}

TEST(Rope, BackwardIsInverseAndGradient) {
  Tensor x = Tensor::uniform({2, 5, 3, 8}, -1, 1, 5);
  Tensor back = rope_backward(rope_forward(x, 10000.0f, 7), 10000.0f, 7);
  EXPECT_TRUE(all_close(back, x, 1e-6f, 1e-5f));
  Tensor w = Tensor::uniform({2, 5, 3, 8}, -1, 1, 6);
  std::vector<float> vw = w.to_f32_vector();
  Tensor grad = rope_backward(w, 10000.0f, 7);
  auto loss = [&] { return weighted_sum(rope_forward(x, 10000.0f, 7), vw); };
  EXPECT_TRUE(check_gradient(x, loss, grad, 1e-3, 1e-3, 1e-2, 240));
}

TEST(Rope, BadShapesThrow) {
  EXPECT_THROW(rope_forward(Tensor::zeros({2, 3, 8}, DType::f32), 10000.0f), Error);     // not 4-D
  EXPECT_THROW(rope_forward(Tensor::zeros({1, 2, 3, 7}, DType::f32), 10000.0f), Error);  // odd D
  EXPECT_THROW(rope_forward(Tensor::zeros({1, 2, 3, 8}, DType::f32), 10000.0f, -1), Error);
  EXPECT_THROW(rope_forward(Tensor::zeros({1, 2, 3, 8}, DType::f32), 0.0f), Error);
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU. Both use the host's fp32 inv_freq, the fp32 angle and the correctly rounded cos/sin
// of it, and no FMA in the rotation, so results are expected bitwise equal; tolerances leave room
// for a 1-ulp difference of the device's double sincos surfacing after rounding:
// f32 atol 1e-6 rtol 1e-6; bf16 atol 4e-3 (one ulp of cos/sin times |x| <= 1) rtol 8e-3.

TEST(RopeCuda, MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  struct Case {
    Shape s;
    int64_t off;
    float theta;
  };
  const Case cases[] = {
      {{2, 37, 3, 128}, 0, 10000.0f},     // odd T
      {{1, 5, 2, 6}, 3, 10000.0f},        // odd half = 3
      {{2, 16, 4, 64}, 100000, 500000.0f},  // large positions
      {{1, 2048, 32, 128}, 0, 10000.0f},  // 8M elements: several grid-stride trips
  };
  for (const Case& cs : cases) {
    for (DType dt : {DType::f32, DType::bf16}) {
      const float atol = dt == DType::bf16 ? 4e-3f : 1e-6f, rtol = dt == DType::bf16 ? 8e-3f : 1e-6f;
      Tensor x = Tensor::uniform(cs.s, -1, 1, 11, dt);
      Tensor x_gpu = x.to(gpu);
      Tensor y = rope_forward(x_gpu, cs.theta, cs.off);
      EXPECT_EQ(y.dtype(), dt);
      EXPECT_TRUE(all_close(y, rope_forward(x, cs.theta, cs.off), atol, rtol)) << cs.s.str() << " " << dtype_name(dt);
      EXPECT_TRUE(all_close(rope_backward(x_gpu, cs.theta, cs.off), rope_backward(x, cs.theta, cs.off), atol, rtol))
          << "backward " << cs.s.str() << " " << dtype_name(dt);
    }
  }
}

TEST(RopeCuda, F32MatchesDoubleFormula) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::uniform({2, 16, 3, 64}, -1, 1, 21);
  EXPECT_TRUE(all_close(rope_forward(x.to(Device::cuda()), 10000.0f).to_f32_vector(),
                        rope_double(x, 10000.0, 0, false), 1e-5f, 0));
}
