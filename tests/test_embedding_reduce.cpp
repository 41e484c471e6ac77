// Embedding gather/scatter and the reductions: CPU values vs loops, finite differences of the
// embedding gradient, bad-id errors, NaN behaviour, and CUDA vs CPU.
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "ops/embedding.h"
#include "ops/reduce.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

std::vector<int32_t> make_ids(int64_t n, int64_t V, uint64_t seed) {
  std::vector<float> u = Tensor::uniform({n}, 0, static_cast<float>(V), seed).to_f32_vector();
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[i] = std::min<int32_t>(static_cast<int32_t>(u[i]), static_cast<int32_t>(V - 1));
  return ids;
}

bool throws_mentioning(const std::function<void()>& f, const std::string& a, const std::string& b) {
  try {
    f();
  } catch (const Error& e) {
    std::string m = e.what();
    return m.find(a) != std::string::npos && m.find(b) != std::string::npos;
  }
  return false;
}

}  // namespace

TEST(Embedding, GathersRows) {
  Tensor table = Tensor::uniform({10, 3}, -1, 1, 1);
  Tensor ids = Tensor::from_i32({4, 0, 9, 4, 2, 7}, {2, 3});
  Tensor y = embedding_forward(ids, table);
  ASSERT_EQ(y.shape(), Shape({2, 3, 3}));
  std::vector<float> t = table.to_f32_vector(), vy = y.to_f32_vector();
  std::vector<int32_t> vi = ids.to_i32_vector();
  for (int n = 0; n < 6; ++n)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(vy[n * 3 + c], t[vi[n] * 3 + c]);
  Tensor yb = embedding_forward(ids.reshape({6}), table.to(DType::bf16));
  EXPECT_EQ(yb.dtype(), DType::bf16);
  EXPECT_EQ(yb.shape(), Shape({6, 3}));
  EXPECT_TRUE(all_close(yb, y.reshape({6, 3}).to(DType::bf16), 0, 0));
}

TEST(Embedding, OutOfRangeIdsNameTheIdAndV) {
  Tensor table = Tensor::uniform({10, 3}, -1, 1, 1);
  EXPECT_TRUE(throws_mentioning([&] { embedding_forward(Tensor::from_i32({1, 10}, {2}), table); }, "10", "V=10"));
  EXPECT_TRUE(throws_mentioning([&] { embedding_forward(Tensor::from_i32({-3}, {1}), table); }, "-3", "V=10"));
  Tensor dy = Tensor::zeros({2, 3}, DType::f32);
  EXPECT_TRUE(throws_mentioning([&] { embedding_backward(dy, Tensor::from_i32({1, 12}, {2}), 10); }, "12", "V=10"));
  EXPECT_THROW(embedding_forward(Tensor::from_f32({1.0f}, {1}), table), Error);  // ids must be i32
}

TEST(Embedding, BackwardAccumulatesRepeatedIdsAndMatchesFiniteDifferences) {
  Tensor table = Tensor::uniform({7, 5}, -1, 1, 2);
  Tensor ids = Tensor::from_i32({3, 1, 3, 6, 3, 0}, {2, 3});  // 3 appears three times, 2/4/5 never
  Tensor w = Tensor::uniform({2, 3, 5}, -1, 1, 3);
  std::vector<float> vw = w.to_f32_vector();
  Tensor grad = embedding_backward(w, ids, 7);
  ASSERT_EQ(grad.shape(), Shape({7, 5}));
  EXPECT_EQ(grad.dtype(), DType::f32);
  std::vector<float> g = grad.to_f32_vector();
  for (int c = 0; c < 5; ++c) {
    EXPECT_FLOAT_EQ(g[3 * 5 + c], vw[0 * 5 + c] + vw[2 * 5 + c] + vw[4 * 5 + c]);
    EXPECT_EQ(g[2 * 5 + c], 0.0f);
  }
  auto loss = [&] {
    std::vector<float> y = embedding_forward(ids, table).to_f32_vector();
    double s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * vw[i];
    return s;
  };
  EXPECT_TRUE(check_gradient(table, loss, grad, 1e-3, 1e-4, 1e-3, 35));
}

TEST(Reduce, RowAndColumnStatisticsMatchLoops) {
  const int64_t R = 6, C = 9;
  Tensor x = Tensor::uniform({2, 3, C}, -3, 2, 4);
  std::vector<float> v = x.to_f32_vector();
  std::vector<float> rmax(R, -INFINITY), rmin(R, INFINITY), rabs(R, 0), cmax(C, -INFINITY), cmin(C, INFINITY),
      cabs(C, 0);
  std::vector<double> rsum(R, 0), csum(C, 0);
  double total = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      float e = v[r * C + c];
      rmax[r] = std::max(rmax[r], e), rmin[r] = std::min(rmin[r], e), rabs[r] = std::max(rabs[r], std::fabs(e));
      cmax[c] = std::max(cmax[c], e), cmin[c] = std::min(cmin[c], e), cabs[c] = std::max(cabs[c], std::fabs(e));
      rsum[r] += e, csum[c] += e, total += e;
    }
  EXPECT_EQ(row_max(x).shape(), Shape({R}));
  EXPECT_EQ(col_max(x).shape(), Shape({C}));
  EXPECT_EQ(row_max(x).to_f32_vector(), rmax);
  EXPECT_EQ(row_min(x).to_f32_vector(), rmin);
  EXPECT_EQ(row_absmax(x).to_f32_vector(), rabs);
  EXPECT_EQ(col_max(x).to_f32_vector(), cmax);
  EXPECT_EQ(col_min(x).to_f32_vector(), cmin);
  EXPECT_EQ(col_absmax(x).to_f32_vector(), cabs);
  EXPECT_TRUE(all_close(row_sum(x).to_f32_vector(), std::vector<float>(rsum.begin(), rsum.end()), 1e-6f, 1e-6f));
  EXPECT_TRUE(all_close(col_sum(x).to_f32_vector(), std::vector<float>(csum.begin(), csum.end()), 1e-6f, 1e-6f));
  EXPECT_NEAR(sum_all(x).item(), total, 1e-5);
  EXPECT_NEAR(mean_all(x).item(), total / (R * C), 1e-6);
  EXPECT_EQ(sum_all(x).shape(), Shape({1}));
  // bf16 input, f32 output.
  EXPECT_EQ(row_absmax(x.to(DType::bf16)).dtype(), DType::f32);
}

TEST(Reduce, NanIsIgnoredByMinMaxAndPropagatedBySums) {
  // Documented behaviour (fmaxf/fminf semantics): NaN does not win a max/min; an all-NaN row gives
  // absmax 0, max -inf, min +inf. Sums propagate NaN.
  Tensor x = Tensor::from_f32({1.0f, NAN, -3.0f, NAN, NAN, NAN}, {2, 3});
  EXPECT_EQ(row_absmax(x).to_f32_vector(), (std::vector<float>{3.0f, 0.0f}));
  EXPECT_EQ(row_max(x).to_f32_vector(), (std::vector<float>{1.0f, -INFINITY}));
  EXPECT_EQ(row_min(x).to_f32_vector(), (std::vector<float>{-3.0f, INFINITY}));
  EXPECT_EQ(col_absmax(x).to_f32_vector(), (std::vector<float>{1.0f, 0.0f, 3.0f}));
  EXPECT_TRUE(std::isnan(row_sum(x).to_f32_vector()[0]));
  EXPECT_TRUE(std::isnan(sum_all(x).item()));
}

TEST(Reduce, EmptyReductions) {
  Tensor e = Tensor::zeros({3, 0}, DType::f32);
  EXPECT_THROW(row_max(e), Error);  // no value to report
  EXPECT_EQ(row_sum(e).to_f32_vector(), (std::vector<float>{0, 0, 0}));
  EXPECT_THROW(col_absmax(Tensor::zeros({0, 4}, DType::f32)), Error);
  EXPECT_THROW(mean_all(Tensor::zeros({0}, DType::f32)), Error);
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU. Embedding forward copies values: exact. Embedding backward: atomicAdd order vs the
// CPU's sequential float sum -> atol 1e-5, rtol 1e-5. min/max/absmax: exact. Row/col sums: fp32
// tree sums on CUDA vs double on the CPU -> atol 1e-5 * sqrt(n), rtol 1e-5. sum_all/mean_all: double
// on both -> atol 1e-5 rtol 1e-6.

TEST(EmbeddingCuda, MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  struct Case {
    int64_t V, C, N;
  };
  const Case cases[] = {{37, 129, 53}, {100, 128, 64}, {4096, 4096, 2048}};
  for (const Case& cs : cases) {
    Tensor ids = Tensor::from_i32(make_ids(cs.N, cs.V, 7), {cs.N});
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor table = Tensor::uniform({cs.V, cs.C}, -1, 1, 8, dt);
      Tensor table_gpu = table.to(gpu);
      Tensor ref = embedding_forward(ids, table);
      // ids on the device (kernel-side check) and on the host (validated before the upload).
      EXPECT_TRUE(all_close(embedding_forward(ids.to(gpu), table_gpu), ref, 0, 0)) << cs.V << "x" << cs.C;
      EXPECT_TRUE(all_close(embedding_forward(ids, table_gpu), ref, 0, 0)) << cs.V << "x" << cs.C;
      Tensor dy = Tensor::uniform({cs.N, cs.C}, -1, 1, 9, dt);
      EXPECT_TRUE(all_close(embedding_backward(dy.to(gpu), ids.to(gpu), cs.V), embedding_backward(dy, ids, cs.V),
                            1e-5f, 1e-5f))
          << "backward " << cs.V << "x" << cs.C << " " << dtype_name(dt);
    }
  }
  // (B, T) ids keep their shape.
  Tensor ids2 = Tensor::from_i32({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor table = Tensor::uniform({8, 16}, -1, 1, 10);
  EXPECT_EQ(embedding_forward(ids2.to(gpu), table.to(gpu)).shape(), Shape({2, 3, 16}));
}

TEST(EmbeddingCuda, OutOfRangeIdsAreDetected) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  Tensor table = Tensor::uniform({50, 8}, -1, 1, 1, DType::f32, gpu);
  Tensor bad = Tensor::from_i32({3, 4, 50, 7, -1}, {5});
  // Device ids: the first bad position (2, id 50) is reported.
  EXPECT_TRUE(throws_mentioning([&] { embedding_forward(bad.to(gpu), table); }, "id 50", "V=50"));
  EXPECT_TRUE(throws_mentioning([&] { embedding_forward(bad, table); }, "id 50", "V=50"));  // host ids
  Tensor dy = Tensor::zeros({5, 8}, DType::f32, gpu);
  EXPECT_TRUE(throws_mentioning([&] { embedding_backward(dy, bad.to(gpu), 50); }, "id 50", "V=50"));
  // The stream is still usable afterwards.
  Tensor ok = Tensor::from_i32({0, 49}, {2}, gpu);
  EXPECT_EQ(embedding_forward(ok, table).shape(), Shape({2, 8}));
}

// One column (ag::gather, e.g. LET's GQA kv -> q expansion: each kv channel read by G query
// channels): the deterministic scan gives the CPU's bits, the same in every run.
TEST(EmbeddingCuda, VectorGatherBackwardIsTheCpusSumInOrder) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  for (int64_t G : {1, 3, 8}) {
    const int64_t Hkv = 8, D = 128, N = Hkv * G * D, V = Hkv * D;
    std::vector<int32_t> idx(static_cast<size_t>(N));
    for (int64_t h = 0; h < Hkv * G; ++h)
      for (int64_t d = 0; d < D; ++d) idx[static_cast<size_t>(h * D + d)] = static_cast<int32_t>((h / G) * D + d);
    Tensor ids = Tensor::from_i32(idx, {N});
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor dy = Tensor::uniform({N, 1}, -1, 1, 11, dt);
      Tensor want = embedding_backward(dy, ids, V);
      Tensor a = embedding_backward(dy.to(gpu), ids.to(gpu), V), b = embedding_backward(dy.to(gpu), ids.to(gpu), V);
      EXPECT_EQ(a.to_f32_vector(), want.to_f32_vector()) << "G " << G << " " << dtype_name(dt);
      EXPECT_EQ(a.to_f32_vector(), b.to_f32_vector()) << "G " << G;
    }
  }
  Tensor bad = Tensor::from_i32({3, 4, 50, 7, -1}, {5});
  Tensor dy = Tensor::zeros({5, 1}, DType::f32, gpu);
  EXPECT_TRUE(throws_mentioning([&] { embedding_backward(dy, bad.to(gpu), 50); }, "id 50", "V=50"));
}

TEST(ReduceCuda, MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  struct Case {
    int64_t R, C;
  };
  // warp-per-row (C <= 512) and block-per-row rows; one and many column chunks; vec and scalar loads.
  const Case cases[] = {{37, 129}, {64, 128}, {5, 1000}, {3, 4097}, {1, 77}, {100000, 3}, {2048, 4096}};
  for (const Case& cs : cases) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor x = Tensor::uniform({cs.R, cs.C}, -2, 1, 11, dt);
      Tensor xg = x.to(gpu);
      const std::string what = std::to_string(cs.R) + "x" + std::to_string(cs.C) + " " + dtype_name(dt);
      EXPECT_TRUE(all_close(row_absmax(xg), row_absmax(x), 0, 0)) << "row_absmax " << what;
      EXPECT_TRUE(all_close(row_min(xg), row_min(x), 0, 0)) << "row_min " << what;
      EXPECT_TRUE(all_close(row_max(xg), row_max(x), 0, 0)) << "row_max " << what;
      EXPECT_TRUE(all_close(col_absmax(xg), col_absmax(x), 0, 0)) << "col_absmax " << what;
      EXPECT_TRUE(all_close(col_min(xg), col_min(x), 0, 0)) << "col_min " << what;
      EXPECT_TRUE(all_close(col_max(xg), col_max(x), 0, 0)) << "col_max " << what;
      EXPECT_TRUE(all_close(row_sum(xg), row_sum(x), 1e-5f * std::sqrt(static_cast<float>(cs.C)), 1e-5f))
          << "row_sum " << what;
      EXPECT_TRUE(all_close(col_sum(xg), col_sum(x), 1e-5f * std::sqrt(static_cast<float>(cs.R)), 1e-5f))
          << "col_sum " << what;
      EXPECT_TRUE(all_close(sum_all(xg), sum_all(x), 1e-5f, 1e-6f)) << "sum_all " << what;
      EXPECT_TRUE(all_close(mean_all(xg), mean_all(x), 1e-7f, 1e-6f)) << "mean_all " << what;
    }
  }
}

TEST(ReduceCuda, DeterministicNanAndMisaligned) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  Tensor x = Tensor::uniform({3001, 1023}, -1, 1, 21, DType::f32, gpu);
  // No float atomics: bitwise identical on repeat.
  EXPECT_EQ(sum_all(x).item(), sum_all(x).item());
  EXPECT_EQ(col_sum(x).to_f32_vector(), col_sum(x).to_f32_vector());
  EXPECT_EQ(row_sum(x).to_f32_vector(), row_sum(x).to_f32_vector());
  // Same NaN behaviour as the CPU (see reduce.h).
  Tensor n = Tensor::from_f32({1.0f, NAN, -3.0f, NAN, NAN, NAN}, {2, 3});
  Tensor ng = n.to(gpu);
  EXPECT_TRUE(all_close(row_absmax(ng), row_absmax(n), 0, 0));
  EXPECT_TRUE(all_close(row_max(ng), row_max(n), 0, 0));
  EXPECT_TRUE(all_close(row_min(ng), row_min(n), 0, 0));
  EXPECT_TRUE(all_close(col_absmax(ng), col_absmax(n), 0, 0));
  EXPECT_TRUE(std::isnan(sum_all(ng).item()));
  // A view one element into its storage: C % 4 == 0 but not 16-byte aligned, so no packed loads.
  Tensor base = Tensor::uniform({1 + 40 * 1024}, -1, 1, 22);
  Tensor v = base.view_rows(1, 40 * 1024).reshape({40, 1024});
  Tensor vg = base.to(gpu).view_rows(1, 40 * 1024).reshape({40, 1024});
  EXPECT_TRUE(all_close(row_absmax(vg), row_absmax(v), 0, 0));
  EXPECT_TRUE(all_close(row_sum(vg), row_sum(v), 1e-4f, 1e-5f));
  EXPECT_TRUE(all_close(sum_all(vg), sum_all(v), 1e-5f, 1e-6f));
}
