// Cross entropy and MSE: CPU values against double formulas, finite-difference checks of the
// backward passes, and CUDA against the CPU reference (f32 and bf16, LLaMA/OPT vocabulary sizes).
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/loss.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

// Deterministic targets in [0, V), with every `ignore_every`-th row set to -100 (ignored).
std::vector<int32_t> make_targets(int64_t N, int64_t V, int ignore_every, uint64_t seed) {
  std::vector<int32_t> t(N);
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (int64_t r = 0; r < N; ++r) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t[r] = static_cast<int32_t>((s >> 33) % static_cast<uint64_t>(V));
    if (ignore_every > 0 && r % ignore_every == ignore_every - 1) t[r] = -100;
  }
  return t;
}

// nll = log Σ exp(v) − v[t] in double (shifted by the max so large logits stay finite); 0 if t < 0.
std::vector<float> ref_nll(const std::vector<float>& l, const std::vector<int32_t>& t, int64_t V) {
  std::vector<float> out(t.size());
  for (size_t r = 0; r < t.size(); ++r) {
    if (t[r] < 0) continue;
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<double>(l[r * V + j]));
    for (int64_t j = 0; j < V; ++j) s += std::exp(l[r * V + j] - m);
    out[r] = static_cast<float>(m + std::log(s) - l[r * V + t[r]]);
  }
  return out;
}

double weighted_sum(const Tensor& weights, const Tensor& values) {
  const std::vector<float> w = weights.to_f32_vector(), v = values.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < w.size(); ++i) s += static_cast<double>(w[i]) * v[i];
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU reference

TEST(LossCpu, CrossEntropyMatchesDoubleFormulaAndIgnoresNegativeTargets) {
  const int64_t N = 9, V = 50;
  Tensor logits = Tensor::uniform({N, V}, -5.0f, 5.0f, 1);
  std::vector<int32_t> t = make_targets(N, V, 3, 2);
  t[0] = -1;  // any negative target is ignored
  Tensor nll = cross_entropy_forward(logits, Tensor::from_i32(t, {N}));
  EXPECT_EQ(nll.shape(), Shape({N}));
  const std::vector<float> got = nll.to_f32_vector();
  EXPECT_TRUE(all_close(got, ref_nll(logits.to_f32_vector(), t, V), 1e-5f, 1e-5f));
  EXPECT_EQ(got[0], 0.0f);
  EXPECT_EQ(got[2], 0.0f);
}

TEST(LossCpu, CrossEntropyIsStableForHugeLogits) {
  // Without the max subtraction exp(1e4) overflows to inf.
  Tensor logits = Tensor::from_f32({1e4f, 1e4f - 1.0f, -1e4f, 0.0f, -3e4f, -3e4f - 2.0f}, {2, 3});
  Tensor nll = cross_entropy_forward(logits, Tensor::from_i32({1, 2}, {2}));
  const std::vector<float> v = nll.to_f32_vector();
  EXPECT_NEAR(v[0], 1.0 + std::log(1.0 + std::exp(-1.0)), 1e-5);  // (m − v_t) + log Σ exp(v − m)
  EXPECT_NEAR(v[1], 30002.0, 1e-2);
}

TEST(LossCpu, CrossEntropyBackwardMatchesFiniteDifferences) {
  const int64_t N = 6, V = 13;
  Tensor logits = Tensor::uniform({N, V}, -3.0f, 3.0f, 11);
  Tensor targets = Tensor::from_i32(make_targets(N, V, 4, 12), {N});
  Tensor dnll = Tensor::uniform({N}, -1.0f, 1.0f, 13);
  Tensor dl = cross_entropy_backward(dnll, logits, targets);
  ASSERT_EQ(dl.shape(), logits.shape());
  auto f = [&] { return weighted_sum(dnll, cross_entropy_forward(logits, targets)); };
  EXPECT_TRUE(check_gradient(logits, f, dl, 1e-3, 1e-4, 1e-2, 78));
  // Rows sum to zero (softmax − one-hot), and the ignored row (index 3) is exactly zero.
  const std::vector<float> g = dl.to_f32_vector();
  for (int64_t r = 0; r < N; ++r) {
    double s = 0;
    for (int64_t j = 0; j < V; ++j) s += g[r * V + j];
    EXPECT_NEAR(s, 0.0, 1e-6) << "row " << r;
  }
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(g[3 * V + j], 0.0f);
}

TEST(LossCpu, CrossEntropyRejectsBadArguments) {
  Tensor logits = Tensor::uniform({3, 5}, -1.0f, 1.0f, 21);
  EXPECT_THROW(cross_entropy_forward(logits, Tensor::from_i32({0, 5, 1}, {3})), Error);  // target == V
  EXPECT_THROW(cross_entropy_forward(logits, Tensor::from_i32({0, 1}, {2})), Error);     // one per row
  EXPECT_THROW(cross_entropy_forward(logits, Tensor::from_f32({0, 1, 2}, {3})), Error);  // i32 targets
  Tensor t = Tensor::from_i32({0, 1, 2}, {3});
  EXPECT_THROW(cross_entropy_backward(Tensor::zeros({2}, DType::f32), logits, t), Error);
  EXPECT_THROW(cross_entropy_backward(Tensor::zeros({3}, DType::bf16), logits, t), Error);
}

TEST(LossCpu, MseMatchesDoubleFormula) {
  Tensor a = Tensor::uniform({3, 41}, -1.0f, 1.0f, 31);
  Tensor b = Tensor::uniform({3, 41}, -1.0f, 1.0f, 32);
  Tensor loss = mse_loss_forward(a, b);
  EXPECT_EQ(loss.shape(), Shape({1}));
  EXPECT_EQ(loss.dtype(), DType::f32);
  const std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < av.size(); ++i) s += (static_cast<double>(av[i]) - bv[i]) * (static_cast<double>(av[i]) - bv[i]);
  EXPECT_NEAR(loss.item(), s / av.size(), 1e-7 * s / av.size());
}

TEST(LossCpu, MseBackwardMatchesFiniteDifferencesForBothInputs) {
  Tensor a = Tensor::uniform({4, 7}, -1.0f, 1.0f, 41);
  Tensor b = Tensor::uniform({4, 7}, -1.0f, 1.0f, 42);
  const float dloss = 0.7f;  // the upstream gradient scales the result
  Tensor da = mse_loss_backward(Tensor::full({1}, dloss, DType::f32), a, b);
  auto f = [&] { return dloss * static_cast<double>(mse_loss_forward(a, b).item()); };
  EXPECT_TRUE(check_gradient(a, f, da, 1e-3, 1e-5, 1e-2, 28));
  // The gradient with respect to b is −da (as ops/loss.h says).
  std::vector<float> neg = da.to_f32_vector();
  for (float& v : neg) v = -v;
  EXPECT_TRUE(check_gradient(b, f, Tensor::from_f32(neg, a.shape()), 1e-3, 1e-5, 1e-2, 28));
}

TEST(LossCpu, MseRejectsBadArguments) {
  Tensor a = Tensor::uniform({4, 7}, -1.0f, 1.0f, 51);
  EXPECT_THROW(mse_loss_forward(a, Tensor::zeros({7, 4}, DType::f32)), Error);
  EXPECT_THROW(mse_loss_forward(a, a.to(DType::bf16)), Error);
  EXPECT_THROW(mse_loss_forward(Tensor::zeros({0}, DType::f32), Tensor::zeros({0}, DType::f32)), Error);
  EXPECT_THROW(mse_loss_backward(Tensor::zeros({2}, DType::f32), a, a), Error);
}

// ---------------------------------------------------------------------------------------------
// CUDA against the CPU reference

namespace {

struct CeCase {
  int64_t N, V;
};
// Warp per row (V <= 1024) and block per row, vectorised (V a multiple of 4/8) and not; the LLaMA
// (32000) and OPT (50272) vocabularies; a large 512 × 32000 batch.
const CeCase kCeCases[] = {{37, 129}, {64, 4096}, {33, 32000}, {5, 50272}, {17, 1000}, {3, 1}, {8, 4099}, {512, 32000}};

// Tolerances: nll f32 atol 1e-5 / rtol 1e-4 (the CPU sums in double, CUDA in fp32); dlogits f32
// atol 1e-6 / rtol 1e-4 (softmax values are ~1/V). bf16: the CPU runs on the same bf16 logits;
// nll is f32 (atol 1e-4 / rtol 1e-4), dlogits bf16 (rtol 1e-2, one bf16 ulp).
void run_ce_case(DType dt, const CeCase& k, uint64_t seed) {
  SCOPED_TRACE(std::string("cross entropy ") + dtype_name(dt) + " [" + std::to_string(k.N) + ", " +
               std::to_string(k.V) + "]");
  const bool bf = dt == DType::bf16;
  const Device gpu = Device::cuda();
  Tensor logits = Tensor::uniform({k.N, k.V}, -8.0f, 8.0f, seed, dt);
  Tensor targets = Tensor::from_i32(make_targets(k.N, k.V, 5, seed + 1), {k.N});
  Tensor dnll = Tensor::uniform({k.N}, -1.0f, 1.0f, seed + 2);
  Tensor nll = cross_entropy_forward(logits, targets);
  Tensor nll_g = cross_entropy_forward(logits.to(gpu), targets.to(gpu));
  ASSERT_TRUE(nll_g.device().is_cuda());
  EXPECT_TRUE(all_close(nll_g, nll, bf ? 1e-4f : 1e-5f, 1e-4f)) << "nll";
  Tensor dl = cross_entropy_backward(dnll, logits, targets);
  Tensor dl_g = cross_entropy_backward(dnll.to(gpu), logits.to(gpu), targets.to(gpu));
  ASSERT_EQ(dl_g.dtype(), dt);
  EXPECT_TRUE(all_close(dl_g, dl, 1e-6f, bf ? 1e-2f : 1e-4f)) << "dlogits";
}

}  // namespace

TEST(LossCuda, CrossEntropyMatchesCpuF32) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 100;
  for (const CeCase& k : kCeCases) run_ce_case(DType::f32, k, seed += 10);
}

TEST(LossCuda, CrossEntropyMatchesCpuBf16) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 200;
  for (const CeCase& k : kCeCases) run_ce_case(DType::bf16, k, seed += 10);
}

TEST(LossCuda, CrossEntropyIsStableForHugeLogitsAndFlagsBadTargets) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  Tensor logits = Tensor::from_f32({1e4f, 1e4f - 1.0f, -1e4f, 0.0f, -3e4f, -3e4f - 2.0f}, {2, 3});
  Tensor t = Tensor::from_i32({1, 2}, {2});
  EXPECT_TRUE(all_close(cross_entropy_forward(logits.to(gpu), t.to(gpu)), cross_entropy_forward(logits, t), 1e-5f,
                        1e-5f));
  Tensor dnll = Tensor::full({2}, 1.0f, DType::f32);
  EXPECT_TRUE(all_close(cross_entropy_backward(dnll.to(gpu), logits.to(gpu), t.to(gpu)),
                        cross_entropy_backward(dnll, logits, t), 1e-6f, 1e-4f));
  // A target >= V cannot throw from a kernel: the row becomes NaN.
  Tensor bad = cross_entropy_forward(logits.to(gpu), Tensor::from_i32({3, -1}, {2}, gpu));
  const std::vector<float> v = bad.to_f32_vector();
  EXPECT_TRUE(std::isnan(v[0]));
  EXPECT_EQ(v[1], 0.0f);
}

namespace {

// MSE tolerances: the loss is a double sum on both sides (rtol 1e-5); da uses the same fp32
// operations on both sides, so f32 is bit-close (atol 1e-7 / rtol 1e-6) and bf16 within one ulp.
void run_mse_case(DType dt, int64_t n, uint64_t seed) {
  SCOPED_TRACE(std::string("mse ") + dtype_name(dt) + " n=" + std::to_string(n));
  const Device gpu = Device::cuda();
  Tensor a = Tensor::uniform({n}, -1.0f, 1.0f, seed, dt);
  Tensor b = Tensor::uniform({n}, -1.0f, 1.0f, seed + 1, dt);
  Tensor ag = a.to(gpu), bg = b.to(gpu);
  Tensor loss = mse_loss_forward(a, b);
  Tensor loss_g = mse_loss_forward(ag, bg);
  ASSERT_TRUE(loss_g.device().is_cuda());  // stays on the device
  EXPECT_TRUE(all_close(loss_g, loss, 0.0f, 1e-5f)) << "loss";
  // Deterministic: the same bits on a second run.
  EXPECT_EQ(mse_loss_forward(ag, bg).item(), loss_g.item());
  Tensor dloss = Tensor::full({1}, 1.5f, DType::f32);
  Tensor da = mse_loss_backward(dloss, a, b);
  Tensor da_g = mse_loss_backward(dloss.to(gpu), ag, bg);  // dloss read on the device
  ASSERT_EQ(da_g.dtype(), dt);
  EXPECT_TRUE(all_close(da_g, da, dt == DType::bf16 ? 1e-9f : 1e-12f, dt == DType::bf16 ? 1e-2f : 1e-6f)) << "da";
}

}  // namespace

TEST(LossCuda, MseMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  uint64_t seed = 300;
  for (DType dt : {DType::f32, DType::bf16})
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{37 * 129}, int64_t{1000003}, int64_t{4096} * 4096})
      run_mse_case(dt, n, seed += 10);
}

TEST(LossCuda, MseHandlesUnalignedViews) {
  OMNIQ_REQUIRE_CUDA();
  Tensor a = Tensor::uniform({1001}, -1.0f, 1.0f, 61, DType::bf16, Device::cuda());
  Tensor b = Tensor::uniform({1001}, -1.0f, 1.0f, 62, DType::bf16, Device::cuda());
  Tensor av = a.view_rows(3, 998), bv = b.view_rows(1, 998);  // offsets of 6 and 2 bytes
  Tensor ref = mse_loss_forward(av.to(Device::cpu()), bv.to(Device::cpu()));
  EXPECT_TRUE(all_close(mse_loss_forward(av, bv), ref, 0.0f, 1e-5f));
  Tensor dloss = Tensor::full({1}, 1.0f, DType::f32);
  EXPECT_TRUE(all_close(mse_loss_backward(dloss.to(Device::cuda()), av, bv),
                        mse_loss_backward(dloss, av.to(Device::cpu()), bv.to(Device::cpu())), 1e-9f, 1e-2f));
}
