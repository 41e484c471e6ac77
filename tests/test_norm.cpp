// RMSNorm / LayerNorm: CPU values against double-precision formulas, finite-difference checks of
// every backward, and CUDA against the CPU reference (f32 and bf16, odd and large shapes).
#include <cmath>
#include <vector>

#include "ops/norm.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

constexpr float kEps = 1e-5f;

// Textbook RMSNorm in double, no intermediate rounding: y = w·x/sqrt(mean(x²)+eps).
std::vector<float> ref_rmsnorm(const std::vector<float>& x, const std::vector<float>& w, int64_t R, int64_t C,
                               std::vector<float>* rstd) {
  std::vector<float> y(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[r * C + c]) * x[r * C + c];
    const double rs = 1.0 / std::sqrt(ss / C + kEps);
    if (rstd) rstd->push_back(static_cast<float>(rs));
    for (int64_t c = 0; c < C; ++c) y[r * C + c] = static_cast<float>(w[c] * (x[r * C + c] * rs));
  }
  return y;
}

// Textbook LayerNorm in double (biased variance).
std::vector<float> ref_layernorm(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b,
                                 int64_t R, int64_t C, std::vector<float>* mean, std::vector<float>* rstd) {
  std::vector<float> y(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double s = 0, ss = 0;
    for (int64_t c = 0; c < C; ++c) s += x[r * C + c];
    const double mu = s / C;
    for (int64_t c = 0; c < C; ++c) ss += (x[r * C + c] - mu) * (x[r * C + c] - mu);
    const double rs = 1.0 / std::sqrt(ss / C + kEps);
    mean->push_back(static_cast<float>(mu));
    rstd->push_back(static_cast<float>(rs));
    for (int64_t c = 0; c < C; ++c) y[r * C + c] = static_cast<float>((x[r * C + c] - mu) * rs * w[c] + b[c]);
  }
  return y;
}

// Σ dy·y in double: the scalar whose gradients the backward functions compute.
double dot(const Tensor& a, const Tensor& b) {
  const std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < av.size(); ++i) s += static_cast<double>(av[i]) * bv[i];
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU reference

TEST(NormCpu, RmsnormMatchesDoubleFormula) {
  const int64_t C = 33;
  Tensor x = Tensor::uniform({3, 5, C}, -2.0f, 2.0f, 1);  // [B, T, C]: rows are flattened
  Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 2);
  Tensor rstd;
  Tensor y = rmsnorm_forward(x, w, kEps, &rstd);
  EXPECT_EQ(y.shape(), x.shape());
  EXPECT_EQ(y.dtype(), DType::f32);
  EXPECT_EQ(rstd.shape(), Shape({15}));
  std::vector<float> ref_rstd;
  std::vector<float> ref = ref_rmsnorm(x.to_f32_vector(), w.to_f32_vector(), 15, C, &ref_rstd);
  EXPECT_TRUE(all_close(y.to_f32_vector(), ref, 1e-6f, 1e-5f));
  EXPECT_TRUE(all_close(rstd.to_f32_vector(), ref_rstd, 0.0f, 1e-6f));
}

// HF LlamaRMSNorm computes weight * (x·rstd).to(bf16): the normalised value is rounded before the
// weight multiply. Check that bit for bit, and that the check can tell the difference.
TEST(NormCpu, RmsnormBf16RoundsNormalisedValueBeforeWeight) {
  const int64_t R = 16, C = 64;
  Tensor x = Tensor::uniform({R, C}, -3.0f, 3.0f, 3, DType::bf16);
  Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 4);
  Tensor rstd;
  Tensor y = rmsnorm_forward(x, w, kEps, &rstd);
  ASSERT_EQ(y.dtype(), DType::bf16);
  const std::vector<float> xv = x.to_f32_vector(), wv = w.to_f32_vector(), yv = y.to_f32_vector();
  const std::vector<float> rs = rstd.to_f32_vector();
  int differs_from_single_rounding = 0;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const float xhat = xv[r * C + c] * rs[r];
      ASSERT_EQ(yv[r * C + c], round_bf16(wv[c] * round_bf16(xhat))) << "row " << r << " col " << c;
      if (round_bf16(wv[c] * xhat) != yv[r * C + c]) ++differs_from_single_rounding;
    }
  }
  EXPECT_GT(differs_from_single_rounding, 0) << "inputs too tame to distinguish the two roundings";
  std::vector<float> ref_rstd;
  ref_rmsnorm(xv, wv, R, C, &ref_rstd);
  EXPECT_TRUE(all_close(rs, ref_rstd, 0.0f, 1e-6f));
}

TEST(NormCpu, LayernormMatchesDoubleFormula) {
  const int64_t R = 7, C = 45;
  for (float offset : {0.0f, 10.0f}) {  // a large row mean must not hurt the variance (two-pass)
    Tensor x = Tensor::uniform({R, C}, offset - 1.0f, offset + 1.0f, 5);
    Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 6);
    Tensor b = Tensor::uniform({C}, -0.5f, 0.5f, 7);
    Tensor mean, rstd;
    Tensor y = layernorm_forward(x, w, b, kEps, &mean, &rstd);
    std::vector<float> ref_mean, ref_rstd;
    std::vector<float> ref = ref_layernorm(x.to_f32_vector(), w.to_f32_vector(), b.to_f32_vector(), R, C, &ref_mean,
                                           &ref_rstd);
    EXPECT_TRUE(all_close(y.to_f32_vector(), ref, 1e-5f, 1e-5f)) << "offset " << offset;
    EXPECT_TRUE(all_close(mean.to_f32_vector(), ref_mean, 1e-6f, 1e-6f)) << "offset " << offset;
    EXPECT_TRUE(all_close(rstd.to_f32_vector(), ref_rstd, 0.0f, 1e-5f)) << "offset " << offset;
  }
}

TEST(NormCpu, RmsnormBackwardMatchesFiniteDifferences) {
  const int64_t R = 4, C = 24;
  Tensor x = Tensor::uniform({R, C}, -2.0f, 2.0f, 11);
  Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 12);
  Tensor dy = Tensor::uniform({R, C}, -1.0f, 1.0f, 13);
  Tensor rstd;
  rmsnorm_forward(x, w, kEps, &rstd);
  NormGrads g = rmsnorm_backward(dy, x, w, rstd);
  EXPECT_FALSE(g.db.defined());
  auto f = [&] { return dot(dy, rmsnorm_forward(x, w, kEps, nullptr)); };
  EXPECT_TRUE(check_gradient(x, f, g.dx, 1e-3, 1e-3, 1e-2, 96));
  EXPECT_TRUE(check_gradient(w, f, g.dw, 1e-3, 1e-3, 1e-2, 24));
}

TEST(NormCpu, LayernormBackwardMatchesFiniteDifferences) {
  const int64_t R = 5, C = 19;
  Tensor x = Tensor::uniform({R, C}, -2.0f, 2.0f, 21);
  Tensor w = Tensor::uniform({C}, 0.5f, 1.5f, 22);
  Tensor b = Tensor::uniform({C}, -0.5f, 0.5f, 23);
  Tensor dy = Tensor::uniform({R, C}, -1.0f, 1.0f, 24);
  Tensor mean, rstd;
  layernorm_forward(x, w, b, kEps, &mean, &rstd);
  NormGrads g = layernorm_backward(dy, x, w, mean, rstd);
  auto f = [&] { return dot(dy, layernorm_forward(x, w, b, kEps, nullptr, nullptr)); };
  EXPECT_TRUE(check_gradient(x, f, g.dx, 1e-3, 1e-3, 1e-2, 95));
  EXPECT_TRUE(check_gradient(w, f, g.dw, 1e-3, 1e-3, 1e-2, 19));
  EXPECT_TRUE(check_gradient(b, f, g.db, 1e-3, 1e-3, 1e-2, 19));
}

TEST(NormCpu, EmptyBatchGivesEmptyOutputAndZeroGradients) {
  Tensor x = Tensor::zeros({0, 8}, DType::f32);
  Tensor w = Tensor::full({8}, 1.0f, DType::f32);
  Tensor b = Tensor::zeros({8}, DType::f32);
  Tensor mean, rstd;
  Tensor y = layernorm_forward(x, w, b, kEps, &mean, &rstd);
  EXPECT_EQ(y.shape(), Shape({0, 8}));
  EXPECT_EQ(rstd.numel(), 0);
  NormGrads g = layernorm_backward(x, x, w, mean, rstd);
  EXPECT_EQ(g.dw.to_f32_vector(), std::vector<float>(8, 0.0f));
  EXPECT_EQ(g.db.to_f32_vector(), std::vector<float>(8, 0.0f));
}

TEST(NormCpu, RejectsBadArguments) {
  Tensor x = Tensor::uniform({4, 8}, -1.0f, 1.0f, 31);
  Tensor w = Tensor::full({8}, 1.0f, DType::f32);
  Tensor b = Tensor::zeros({8}, DType::f32);
  EXPECT_THROW(rmsnorm_forward(x, Tensor::full({7}, 1.0f, DType::f32), kEps, nullptr), Error);
  EXPECT_THROW(rmsnorm_forward(x, w.to(DType::bf16), kEps, nullptr), Error);  // weights stay f32
  EXPECT_THROW(rmsnorm_forward(x, w, -1.0f, nullptr), Error);
  EXPECT_THROW(rmsnorm_forward(Tensor::zeros({4, 8}, DType::i32), w, kEps, nullptr), Error);
  EXPECT_THROW(layernorm_forward(x, w, Tensor::zeros({9}, DType::f32), kEps, nullptr, nullptr), Error);
  Tensor rstd;
  rmsnorm_forward(x, w, kEps, &rstd);
  EXPECT_THROW(rmsnorm_backward(x.to(DType::bf16), x, w, rstd), Error);             // dy dtype
  EXPECT_THROW(rmsnorm_backward(x.reshape({8, 4}), x, w, rstd), Error);            // dy shape
  EXPECT_THROW(rmsnorm_backward(x, x, w, Tensor::zeros({3}, DType::f32)), Error);  // one rstd per row
  try {
    rmsnorm_forward(x, Tensor::full({7}, 1.0f, DType::f32), kEps, nullptr);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rmsnorm_forward"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA against the CPU reference

namespace {

struct NormCase {
  int64_t rows, C;
};
// Layouts covered: warp per row (C <= 1024) and block per row, each with 16-byte vector accesses
// (C a multiple of 4 for f32 / 8 for bf16) and element by element (odd C; 4100 is vector for f32
// only); C = 1 and a large 4096 × 4096.
const NormCase kCases[] = {{37, 129}, {64, 256}, {3, 1}, {5, 1030}, {9, 4100}, {3, 8192}, {130, 1024}, {4096, 4096}};

// Tolerances: f32 atol 1e-5 / rtol 1e-4 on values and dx (both sides fp32, the CPU sums in double);
// bf16 compares with the CPU run on the same bf16 inputs, rtol 1e-2 (one bf16 ulp is <= 2^-7
// relative). dw/db are sums over rows: their atol grows with the row count (fp32 summation error),
// and in bf16 a rare 1-ulp flip of RMSNorm's rounded x̂ adds up to ~0.016 per flip.
void run_norm_case(bool layer, DType dt, const NormCase& k, uint64_t seed) {
  SCOPED_TRACE(std::string(layer ? "layernorm " : "rmsnorm ") + dtype_name(dt) + " [" + std::to_string(k.rows) +
               ", " + std::to_string(k.C) + "]");
  const bool bf = dt == DType::bf16;
  const float atol = bf ? 1e-3f : 1e-5f, rtol = bf ? 1e-2f : 1e-4f;
  const float sum_atol = (bf ? 2e-2f : 1e-5f) + 2e-6f * static_cast<float>(k.rows);
  const float sum_rtol = bf ? 2e-3f : 1e-4f;
  const Device gpu = Device::cuda();
  Tensor x = Tensor::uniform({k.rows, k.C}, -2.0f, 2.5f, seed, dt);  // nonzero mean on purpose
  Tensor w = Tensor::uniform({k.C}, 0.5f, 1.5f, seed + 1);
  Tensor b = Tensor::uniform({k.C}, -0.5f, 0.5f, seed + 2);
  Tensor dy = Tensor::uniform({k.rows, k.C}, -1.0f, 1.0f, seed + 3, dt);
  Tensor xg = x.to(gpu), wg = w.to(gpu), bg = b.to(gpu), dyg = dy.to(gpu);

  Tensor mean, rstd, mean_g, rstd_g;
  Tensor y = layer ? layernorm_forward(x, w, b, kEps, &mean, &rstd) : rmsnorm_forward(x, w, kEps, &rstd);
  Tensor yg = layer ? layernorm_forward(xg, wg, bg, kEps, &mean_g, &rstd_g) : rmsnorm_forward(xg, wg, kEps, &rstd_g);
  ASSERT_TRUE(yg.device().is_cuda());
  ASSERT_EQ(yg.dtype(), dt);
  EXPECT_TRUE(all_close(yg, y, atol, rtol)) << "y";
  EXPECT_TRUE(all_close(rstd_g, rstd, 0.0f, 1e-5f)) << "rstd";
  if (layer) EXPECT_TRUE(all_close(mean_g, mean, 1e-6f, 1e-5f)) << "mean";

  NormGrads g = layer ? layernorm_backward(dy, x, w, mean, rstd) : rmsnorm_backward(dy, x, w, rstd);
  NormGrads gg = layer ? layernorm_backward(dyg, xg, wg, mean_g, rstd_g) : rmsnorm_backward(dyg, xg, wg, rstd_g);
  ASSERT_EQ(gg.dx.dtype(), dt);
  EXPECT_TRUE(all_close(gg.dx, g.dx, atol, rtol)) << "dx";
  EXPECT_TRUE(all_close(gg.dw, g.dw, sum_atol, sum_rtol)) << "dw";
  if (layer) EXPECT_TRUE(all_close(gg.db, g.db, sum_atol, sum_rtol)) << "db";

  // dw/db are reduced in a fixed order: a second run gives the same bits.
  NormGrads again = layer ? layernorm_backward(dyg, xg, wg, mean_g, rstd_g) : rmsnorm_backward(dyg, xg, wg, rstd_g);
  EXPECT_EQ(again.dw.to_f32_vector(), gg.dw.to_f32_vector());
  EXPECT_EQ(again.dx.to_f32_vector(), gg.dx.to_f32_vector());
}

}  // namespace

TEST(NormCuda, RmsnormMatchesCpuF32) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 100;
  for (const NormCase& k : kCases) run_norm_case(false, DType::f32, k, seed += 10);
}

TEST(NormCuda, RmsnormMatchesCpuBf16) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 200;
  for (const NormCase& k : kCases) run_norm_case(false, DType::bf16, k, seed += 10);
}

TEST(NormCuda, LayernormMatchesCpuF32) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 300;
  for (const NormCase& k : kCases) run_norm_case(true, DType::f32, k, seed += 10);
}

TEST(NormCuda, LayernormMatchesCpuBf16) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 400;
  for (const NormCase& k : kCases) run_norm_case(true, DType::bf16, k, seed += 10);
}

// [B, T, C] inputs and row views (offset storage) go through the same kernels.
TEST(NormCuda, HandlesThreeDimensionalInputsAndRowViews) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::uniform({2, 9, 129}, -2.0f, 2.0f, 51, DType::bf16);
  Tensor w = Tensor::uniform({129}, 0.5f, 1.5f, 52);
  Tensor xv = x.view_rows(1, 1);  // [1, 9, 129] starting 9·129 elements in: not 16-byte aligned
  Tensor ref = rmsnorm_forward(xv, w, kEps, nullptr);
  Tensor got = rmsnorm_forward(xv.to(Device::cuda()), w.to(Device::cuda()), kEps, nullptr);
  EXPECT_EQ(got.shape(), Shape({1, 9, 129}));
  EXPECT_TRUE(all_close(got, ref, 1e-3f, 1e-2f));
  Tensor xg = x.to(Device::cuda());
  Tensor whole = rmsnorm_forward(xg, w.to(Device::cuda()), kEps, nullptr);
  EXPECT_TRUE(all_close(whole, rmsnorm_forward(x, w, kEps, nullptr), 1e-3f, 1e-2f));
}

TEST(NormCuda, RejectsUnsupportedDtypeAndMixedDevices) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::uniform({4, 8}, -1.0f, 1.0f, 61, DType::f16, Device::cuda());
  Tensor w = Tensor::full({8}, 1.0f, DType::f32, Device::cuda());
  EXPECT_THROW(rmsnorm_forward(x, w, kEps, nullptr), Error);  // CUDA kernels: f32 and bf16 only
  Tensor xf = Tensor::uniform({4, 8}, -1.0f, 1.0f, 62, DType::f32, Device::cuda());
  EXPECT_THROW(rmsnorm_forward(xf, Tensor::full({8}, 1.0f, DType::f32), kEps, nullptr), Error);
}
