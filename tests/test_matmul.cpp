// GEMM ops: CPU reference (both the BLAS and the built-in blocked path) vs naive triple loops,
// finite-difference checks of linear_backward, and CUDA (cuBLASLt) vs CPU in f32, bf16 and f16.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/matmul.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::all_close;

std::vector<float> random_vec(size_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Row-major C = alpha·op(A)·op(B) + beta·C in double (beta == 0 ignores C entirely).
std::vector<float> naive_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                              const std::vector<float>& A, int64_t lda, const std::vector<float>& B, int64_t ldb,
                              float beta, const std::vector<float>& C, int64_t ldc) {
  std::vector<float> out = C;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += static_cast<double>(ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      out[i * ldc + j] = static_cast<float>(alpha * s + (beta == 0.f ? 0.0 : beta * C[i * ldc + j]));
    }
  return out;
}

// Y[R, N] = X[R, K]·W[N, K]ᵀ (+ b) in double.
std::vector<double> naive_linear(const std::vector<float>& x, const std::vector<float>& w, const float* b, int64_t R,
                                 int64_t N, int64_t K) {
  std::vector<double> y(static_cast<size_t>(R * N));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) {
      double s = b ? b[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[r * K + k]) * w[n * K + k];
      y[r * N + n] = s;
    }
  return y;
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

using GemmFn = void (*)(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                        float, float*, int64_t);

// Checks one gemm implementation on all four transposes with padded leading dimensions.
void check_gemm_impl(GemmFn fn, int64_t M, int64_t N, int64_t K, const char* name) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (float beta : {0.f, 0.3f}) {
        SCOPED_TRACE(testing::Message() << name << " ta=" << ta << " tb=" << tb << " beta=" << beta << " M=" << M
                                        << " N=" << N << " K=" << K);
        const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
        const auto A = random_vec(static_cast<size_t>((ta ? K : M) * lda), 1);
        const auto B = random_vec(static_cast<size_t>((tb ? N : K) * ldb), 2);
        auto C = random_vec(static_cast<size_t>(M * ldc), 3);
        if (beta == 0.f)  // beta == 0 must overwrite, never read, C
          for (float& c : C) c = std::numeric_limits<float>::quiet_NaN();
        const auto ref = naive_gemm(ta, tb, M, N, K, 0.7f, A, lda, B, ldb, beta, C, ldc);
        std::vector<float> got = C;
        fn(ta, tb, M, N, K, 0.7f, A.data(), lda, B.data(), ldb, beta, got.data(), ldc);
        // compare only the M x N block (padding columns keep whatever they had)
        std::vector<float> g2, r2;
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) g2.push_back(got[i * ldc + j]), r2.push_back(ref[i * ldc + j]);
        EXPECT_TRUE(all_close(g2, r2, 1e-4f, 1e-4f));  // fp32 accumulation vs double: ~1e-6 relative
      }
}

// ---------------------------------------------------------------------------------------------
// CPU

TEST(MatmulCpu, GemmMatchesNaiveBothPaths) {
  std::printf("gemm_f32 uses %s\n", cpu::gemm_uses_blas() ? "OpenBLAS" : "the blocked loop");
  check_gemm_impl(cpu::gemm_f32, 37, 53, 29, "gemm_f32");
  check_gemm_impl(cpu::gemm_f32_blocked, 37, 53, 29, "gemm_f32_blocked");
  // Crosses every block boundary of the blocked kernel (64 x 256 x 512) with ragged edges.
  check_gemm_impl(cpu::gemm_f32_blocked, 133, 517, 300, "gemm_f32_blocked");
  check_gemm_impl(cpu::gemm_f32_blocked, 1, 1, 1, "gemm_f32_blocked");
}

TEST(MatmulCpu, GemmZeroKScalesC) {
  std::vector<float> C = {1, 2, 3, 4};
  cpu::gemm_f32(false, false, 2, 2, 0, 1.f, nullptr, 1, nullptr, 2, 0.5f, C.data(), 2);
  EXPECT_TRUE(all_close(C, {0.5f, 1.f, 1.5f, 2.f}, 0, 0));
  cpu::gemm_f32_blocked(false, false, 2, 2, 0, 1.f, nullptr, 1, nullptr, 2, 0.f, C.data(), 2);
  EXPECT_TRUE(all_close(C, {0, 0, 0, 0}, 0, 0));
}

TEST(MatmulCpu, LinearForwardMatchesNaive) {
  const int64_t N = 53, K = 29;
  const std::vector<Shape> x_shapes = {Shape{37, K}, Shape{3, 5, K}, Shape{2, 3, 4, K}, Shape{K}};
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (const Shape& xs : x_shapes)
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << xs.str() << " bias=" << with_bias);
        Tensor x = Tensor::uniform(xs, -1, 1, 11, dt);
        Tensor w = Tensor::uniform(Shape{N, K}, -1, 1, 12, dt);
        Tensor b = Tensor::uniform(Shape{N}, -1, 1, 13, dt);
        Tensor y = linear_forward(x, w, with_bias ? &b : nullptr);
        Shape ys = xs;
        ys.dims[ys.ndim - 1] = N;
        ASSERT_EQ(y.shape(), ys);
        ASSERT_EQ(y.dtype(), dt);
        // reference on the values the tensors actually hold (already rounded to dt)
        const auto bv = b.to_f32_vector();
        const auto ref = naive_linear(x.to_f32_vector(), w.to_f32_vector(), with_bias ? bv.data() : nullptr,
                                      x.rows(), N, K);
        // f32: fp32 vs double accumulation; 16-bit: one rounding of the output (2^-8 relative for bf16)
        const float rtol = dt == DType::f32 ? 1e-5f : 1e-2f, atol = dt == DType::f32 ? 1e-5f : 1e-3f;
        EXPECT_TRUE(all_close(y.to_f32_vector(), to_float(ref), atol, rtol));
      }
}

TEST(MatmulCpu, LinearBackwardMatchesNaive) {
  const int64_t R = 37, N = 53, K = 29;
  Tensor x = Tensor::uniform(Shape{R, K}, -1, 1, 21);
  Tensor w = Tensor::uniform(Shape{N, K}, -1, 1, 22);
  Tensor dy = Tensor::uniform(Shape{R, N}, -1, 1, 23);
  LinearGrads g = linear_backward(dy, x, w, true, true, true);
  ASSERT_EQ(g.dx.shape(), x.shape());
  ASSERT_EQ(g.dw.shape(), w.shape());
  ASSERT_EQ(g.db.shape(), Shape{N});
  EXPECT_EQ(g.dw.dtype(), DType::f32);
  EXPECT_EQ(g.db.dtype(), DType::f32);
  const auto X = x.to_f32_vector(), W = w.to_f32_vector(), DY = dy.to_f32_vector();
  EXPECT_TRUE(all_close(g.dx.to_f32_vector(), naive_gemm(false, false, R, K, N, 1.f, DY, N, W, K, 0.f,
                                                         std::vector<float>(R * K), K), 1e-5f, 1e-5f));
  EXPECT_TRUE(all_close(g.dw.to_f32_vector(), naive_gemm(true, false, N, K, R, 1.f, DY, N, X, K, 0.f,
                                                         std::vector<float>(N * K), K), 1e-5f, 1e-5f));
  std::vector<float> db(N, 0.f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) db[n] += DY[r * N + n];
  EXPECT_TRUE(all_close(g.db.to_f32_vector(), db, 1e-5f, 1e-5f));

  LinearGrads only_dw = linear_backward(dy, x, w, false, true, false);
  EXPECT_FALSE(only_dw.dx.defined());
  EXPECT_TRUE(only_dw.dw.defined());
  EXPECT_FALSE(only_dw.db.defined());

  // bf16 activations: dx in bf16, dw/db stay f32.
  LinearGrads gb = linear_backward(dy.to(DType::bf16), x.to(DType::bf16), w.to(DType::bf16), true, true, true);
  EXPECT_EQ(gb.dx.dtype(), DType::bf16);
  EXPECT_EQ(gb.dw.dtype(), DType::f32);
  EXPECT_EQ(gb.db.dtype(), DType::f32);
}

TEST(MatmulCpu, LinearBackwardFiniteDifferences) {
  const int64_t N = 5, K = 7;
  Tensor x = Tensor::uniform(Shape{3, 4, K}, -1, 1, 31);  // 3-D input: 12 rows
  Tensor w = Tensor::uniform(Shape{N, K}, -1, 1, 32);
  Tensor b = Tensor::uniform(Shape{N}, -1, 1, 33);
  Tensor dy = Tensor::uniform(Shape{3, 4, N}, -1, 1, 34);
  const auto G = dy.to_f32_vector();
  // f = Σ dy ⊙ (x·wᵀ + b), in double from the tensors' current values; ∂f/∂(x, w, b) = (dx, dw, db).
  auto f = [&]() {
    const auto bv = b.to_f32_vector();
    const auto y = naive_linear(x.to_f32_vector(), w.to_f32_vector(), bv.data(), x.rows(), N, K);
    double s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += G[i] * y[i];
    return s;
  };
  LinearGrads g = linear_backward(dy, x, w, true, true, true);
  EXPECT_TRUE(test::check_gradient(x, f, g.dx));
  EXPECT_TRUE(test::check_gradient(w, f, g.dw));
  EXPECT_TRUE(test::check_gradient(b, f, g.db));
}

TEST(MatmulCpu, BmmMatchesNaive) {
  const int64_t Bt = 3, M = 37, N = 53, K = 29;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      SCOPED_TRACE(testing::Message() << "ta=" << ta << " tb=" << tb);
      Tensor a = Tensor::uniform(ta ? Shape{Bt, K, M} : Shape{Bt, M, K}, -1, 1, 41);
      Tensor b = Tensor::uniform(tb ? Shape{Bt, N, K} : Shape{Bt, K, N}, -1, 1, 42);
      Tensor c = bmm(a, b, ta, tb, 0.5f);
      ASSERT_EQ(c.shape(), (Shape{Bt, M, N}));
      const auto A = a.to_f32_vector(), B = b.to_f32_vector(), C = c.to_f32_vector();
      for (int64_t i = 0; i < Bt; ++i) {
        std::vector<float> Ai(A.begin() + i * M * K, A.begin() + (i + 1) * M * K);
        std::vector<float> Bi(B.begin() + i * K * N, B.begin() + (i + 1) * K * N);
        std::vector<float> Ci(C.begin() + i * M * N, C.begin() + (i + 1) * M * N);
        const auto ref = naive_gemm(ta, tb, M, N, K, 0.5f, Ai, ta ? M : K, Bi, tb ? K : N, 0.f,
                                    std::vector<float>(M * N), N);
        EXPECT_TRUE(all_close(Ci, ref, 1e-5f, 1e-5f));
      }
    }
  // 4-D batch and an explicit output dtype
  Tensor a4 = Tensor::uniform(Shape{2, 3, 4, 5}, -1, 1, 43, DType::bf16);
  Tensor b4 = Tensor::uniform(Shape{2, 3, 6, 5}, -1, 1, 44, DType::bf16);
  Tensor c4 = bmm(a4, b4, false, true, 1.f, DType::f32);
  EXPECT_EQ(c4.shape(), (Shape{2, 3, 4, 6}));
  EXPECT_EQ(c4.dtype(), DType::f32);
  EXPECT_EQ(bmm(a4, b4, false, true).dtype(), DType::bf16);
}

TEST(MatmulCpu, RejectsBadArguments) {
  Tensor x = Tensor::uniform(Shape{4, 7}, -1, 1, 1);
  Tensor w = Tensor::uniform(Shape{5, 6}, -1, 1, 2);
  EXPECT_THROW(linear_forward(x, w), Error);  // K mismatch
  Tensor w7 = Tensor::uniform(Shape{5, 7}, -1, 1, 3);
  Tensor bad_bias = Tensor::uniform(Shape{4}, -1, 1, 4);
  EXPECT_THROW(linear_forward(x, w7, &bad_bias), Error);
  EXPECT_THROW(linear_forward(x.to(DType::bf16), w7), Error);  // dtype mismatch
  Tensor dy_bad = Tensor::uniform(Shape{3, 5}, -1, 1, 5);
  EXPECT_THROW(linear_backward(dy_bad, x, w7, true, true, true), Error);
  Tensor a = Tensor::uniform(Shape{2, 3, 4}, -1, 1, 6);
  Tensor b = Tensor::uniform(Shape{2, 5, 6}, -1, 1, 7);
  EXPECT_THROW(bmm(a, b, false, false), Error);  // inner dims 4 vs 5
  Tensor b3 = Tensor::uniform(Shape{3, 4, 6}, -1, 1, 8);
  EXPECT_THROW(bmm(a, b3, false, false), Error);  // batch 2 vs 3
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

struct LinearCase {
  Shape x;
  int64_t N;
};

// bf16/f16 tolerances: both sides accumulate in fp32 and round the output once (epilogue bias) or
// twice (bias kernel fallback), so they differ by about one 16-bit ulp: rtol 2e-2.
void check_linear_forward_cuda(DType dt, const LinearCase& c, bool with_bias, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N << " bias=" << with_bias);
  const int64_t K = c.x.dims[c.x.ndim - 1];
  Tensor x = Tensor::uniform(c.x, -1, 1, seed, dt);
  Tensor w = Tensor::uniform(Shape{c.N, K}, -1, 1, seed + 1, dt);
  Tensor b = Tensor::uniform(Shape{c.N}, -1, 1, seed + 2, dt);
  Tensor ref = linear_forward(x, w, with_bias ? &b : nullptr);
  Tensor xd = x.to(Device::cuda()), wd = w.to(Device::cuda()), bd = b.to(Device::cuda());
  Tensor got = linear_forward(xd, wd, with_bias ? &bd : nullptr);
  ASSERT_EQ(got.shape(), ref.shape());
  ASSERT_EQ(got.dtype(), dt);
  const float atol = dt == DType::f32 ? 1e-4f : 1e-2f, rtol = dt == DType::f32 ? 1e-4f : 2e-2f;
  EXPECT_TRUE(all_close(got.to(Device::cpu()), ref, atol, rtol));
}

const std::vector<LinearCase> kLinearCases = {
    {Shape{37, 29}, 53}, {Shape{512, 768}, 1024}, {Shape{4, 9, 29}, 53}, {Shape{2, 3, 16, 64}, 96}};

TEST(MatmulCuda, LinearForwardF32MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const auto& c : kLinearCases)
    for (bool bias : {false, true}) check_linear_forward_cuda(DType::f32, c, bias, 100);
}

TEST(MatmulCuda, LinearForwardBf16F16MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::bf16, DType::f16})
    for (const auto& c : kLinearCases)
      for (bool bias : {false, true}) check_linear_forward_cuda(dt, c, bias, 200);
}

TEST(MatmulCuda, LinearBackwardMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (const auto& c : std::vector<LinearCase>{{Shape{37, 29}, 53}, {Shape{512, 768}, 1024}, {Shape{4, 9, 29}, 53}}) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " x" << c.x.str() << " N=" << c.N);
      const int64_t K = c.x.dims[c.x.ndim - 1];
      Shape ys = c.x;
      ys.dims[ys.ndim - 1] = c.N;
      Tensor x = Tensor::uniform(c.x, -1, 1, 300, dt);
      Tensor w = Tensor::uniform(Shape{c.N, K}, -1, 1, 301, dt);
      Tensor dy = Tensor::uniform(ys, -1, 1, 302, dt);
      LinearGrads ref = linear_backward(dy, x, w, true, true, true);
      LinearGrads got =
          linear_backward(dy.to(Device::cuda()), x.to(Device::cuda()), w.to(Device::cuda()), true, true, true);
      ASSERT_EQ(got.dw.dtype(), DType::f32);
      ASSERT_EQ(got.db.dtype(), DType::f32);
      ASSERT_EQ(got.dx.dtype(), dt);
      // dw/db are fp32 results of identical inputs on both sides: tight in every dtype.
      EXPECT_TRUE(all_close(got.dw.to(Device::cpu()), ref.dw, 1e-3f, 1e-4f));
      EXPECT_TRUE(all_close(got.db.to(Device::cpu()), ref.db, 1e-3f, 1e-4f));
      const float atol = dt == DType::f32 ? 1e-4f : 1e-2f, rtol = dt == DType::f32 ? 1e-4f : 2e-2f;
      EXPECT_TRUE(all_close(got.dx.to(Device::cpu()), ref.dx, atol, rtol));
    }
}

// dW in the compute dtype (a fake-quantized weight's gradient, as under autocast): the f32 result
// rounded once, so within one bf16/f16 ulp (2^-8 relative) of the CPU's f32 dW; dx/db unchanged.
TEST(MatmulCuda, LinearBackwardWeightGradInComputeDtype) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::bf16, DType::f16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = Tensor::uniform(Shape{2, 64, 96}, -1, 1, 310, dt);
    Tensor w = Tensor::uniform(Shape{80, 96}, -1, 1, 311, dt);
    Tensor dy = Tensor::uniform(Shape{2, 64, 80}, -1, 1, 312, dt);
    LinearGrads ref = linear_backward(dy, x, w, false, true, false);
    LinearGrads got = linear_backward(dy.to(Device::cuda()), x.to(Device::cuda()), w.to(Device::cuda()), false, true,
                                      false, dt);
    ASSERT_EQ(got.dw.dtype(), dt);
    EXPECT_TRUE(all_close(got.dw.to(Device::cpu()).to(DType::f32), ref.dw, 1e-3f, 1e-2f));
    EXPECT_FALSE(got.dx.defined());
  }
  Tensor x = Tensor::uniform(Shape{4, 8}, -1, 1, 1, DType::bf16), w = Tensor::uniform(Shape{3, 8}, -1, 1, 2, DType::bf16);
  Tensor dy = Tensor::uniform(Shape{4, 3}, -1, 1, 3, DType::bf16);
  EXPECT_THROW(linear_backward(dy, x, w, false, true, false, DType::f16), Error);  // neither f32 nor x's dtype
}

// Views at odd element offsets are only 2- or 4-byte aligned: cuBLASLt must be told (it assumes 256).
TEST(MatmulCuda, LinearOnUnalignedViews) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t R = 33, K = 29, N = 45;
    Tensor xbig = Tensor::uniform(Shape{R + 1, K}, -1, 1, 400, dt);
    Tensor w = Tensor::uniform(Shape{N, K}, -1, 1, 401, dt);
    Tensor bbig = Tensor::uniform(Shape{N + 1}, -1, 1, 402, dt);
    Tensor x = xbig.view_rows(1, R);
    Tensor b = bbig.view_rows(1, N);
    Tensor ref = linear_forward(x, w, &b);
    Tensor xbig_d = xbig.to(Device::cuda()), bbig_d = bbig.to(Device::cuda()), wd = w.to(Device::cuda());
    Tensor xd = xbig_d.view_rows(1, R), bd = bbig_d.view_rows(1, N);
    Tensor got = linear_forward(xd, wd, &bd);
    const float atol = dt == DType::f32 ? 1e-4f : 1e-2f, rtol = dt == DType::f32 ? 1e-4f : 2e-2f;
    EXPECT_TRUE(all_close(got.to(Device::cpu()), ref, atol, rtol));
    // backward with x still the unaligned view (it is cuBLASLt's B operand of dW = dYᵀ·X)
    LinearGrads gref = linear_backward(ref, x, w, true, true, true);
    LinearGrads gd = linear_backward(ref.to(Device::cuda()), xd, wd, true, true, true);
    EXPECT_TRUE(all_close(gd.dx.to(Device::cpu()), gref.dx, atol, rtol));
    EXPECT_TRUE(all_close(gd.dw.to(Device::cpu()), gref.dw, 1e-3f, 1e-4f));
  }
}

// The plan cache keeps the descriptor per shape; the bias pointer must still follow each call.
TEST(MatmulCuda, RepeatedCallsReuseThePlanWithTheirOwnBias) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::uniform(Shape{64, 128}, -1, 1, 500);
  Tensor w = Tensor::uniform(Shape{96, 128}, -1, 1, 501);
  Tensor b1 = Tensor::uniform(Shape{96}, -1, 1, 502);
  Tensor b2 = Tensor::uniform(Shape{96}, 5, 6, 503);
  Tensor xd = x.to(Device::cuda()), wd = w.to(Device::cuda());
  Tensor b1d = b1.to(Device::cuda()), b2d = b2.to(Device::cuda());
  Tensor y1 = linear_forward(xd, wd, &b1d).to(Device::cpu());
  Tensor y2 = linear_forward(xd, wd, &b2d).to(Device::cpu());
  Tensor y1_again = linear_forward(xd, wd, &b1d).to(Device::cpu());
  EXPECT_TRUE(all_close(y1, linear_forward(x, w, &b1), 1e-4f, 1e-4f));
  EXPECT_TRUE(all_close(y2, linear_forward(x, w, &b2), 1e-4f, 1e-4f));
  EXPECT_TRUE(all_close(y1_again, y1, 0.f, 0.f));  // deterministic
}

TEST(MatmulCuda, BmmMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t Bt = 3, M = 37, N = 53, K = 29;
  struct Types {
    DType in, out;
  };
  for (Types t : {Types{DType::f32, DType::f32}, Types{DType::bf16, DType::bf16}, Types{DType::bf16, DType::f32},
                  Types{DType::f16, DType::f32}, Types{DType::f32, DType::bf16}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        SCOPED_TRACE(testing::Message() << dtype_name(t.in) << "->" << dtype_name(t.out) << " ta=" << ta
                                        << " tb=" << tb);
        Tensor a = Tensor::uniform(ta ? Shape{Bt, K, M} : Shape{Bt, M, K}, -1, 1, 600, t.in);
        Tensor b = Tensor::uniform(tb ? Shape{Bt, N, K} : Shape{Bt, K, N}, -1, 1, 601, t.in);
        Tensor ref = bmm(a, b, ta, tb, 0.25f, t.out);
        Tensor got = bmm(a.to(Device::cuda()), b.to(Device::cuda()), ta, tb, 0.25f, t.out);
        ASSERT_EQ(got.dtype(), t.out);
        const float atol = t.out == DType::f32 ? 1e-5f : 1e-2f, rtol = t.out == DType::f32 ? 1e-4f : 2e-2f;
        EXPECT_TRUE(all_close(got.to(Device::cpu()), ref, atol, rtol));
      }
  // 4-D batch, larger
  Tensor a = Tensor::uniform(Shape{2, 4, 256, 64}, -1, 1, 602, DType::bf16);
  Tensor b = Tensor::uniform(Shape{2, 4, 256, 64}, -1, 1, 603, DType::bf16);
  Tensor ref = bmm(a, b, false, true, 0.125f, DType::f32);
  Tensor got = bmm(a.to(Device::cuda()), b.to(Device::cuda()), false, true, 0.125f, DType::f32);
  EXPECT_TRUE(all_close(got.to(Device::cpu()), ref, 1e-4f, 1e-4f));
}

#ifdef OMNIQ_HAS_CUDA
// cuda::gemm with beta = 1 accumulates into C (attention's dK/dV rely on it).
TEST(MatmulCuda, GemmAccumulatesWithBeta) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t M = 19, N = 23, K = 31;
  const auto A = random_vec(M * K, 700), B = random_vec(K * N, 701), C0 = random_vec(M * N, 702);
  Tensor a = Tensor::from_f32(A, Shape{M, K}, DType::f32, Device::cuda());
  Tensor b = Tensor::from_f32(B, Shape{K, N}, DType::f32, Device::cuda());
  Tensor c = Tensor::from_f32(C0, Shape{M, N}, DType::f32, Device::cuda());
  cuda::GemmArgs g;
  g.M = M, g.N = N, g.K = K;
  g.alpha = 0.5f, g.beta = 1.f;
  g.A = a.data(), g.lda = K;
  g.B = b.data(), g.ldb = N;
  g.C = c.data(), g.ldc = N;
  cuda::gemm(g);
  const auto ref = naive_gemm(false, false, M, N, K, 0.5f, A, K, B, N, 1.f, C0, N);
  EXPECT_TRUE(all_close(c.to(Device::cpu()).to_f32_vector(), ref, 1e-5f, 1e-5f));
}
#endif

}  // namespace
}  // namespace omniq
