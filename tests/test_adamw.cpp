// AdamW: several steps against a double-precision transcription of the PyTorch documentation's
// algorithm (with weight decay), closed-form properties, argument checks, and CUDA vs CPU.
#include <cmath>
#include <vector>

#include "ops/adamw.h"
#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_graph.h"
#endif
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;

namespace {

// torch.optim.AdamW as documented, in double.
struct RefAdamW {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& g, const AdamWConfig& c, int64_t t) {
    const double lr = c.lr, b1 = c.beta1, b2 = c.beta2, eps = c.eps, wd = c.weight_decay;
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * static_cast<double>(g[i]) * g[i];
      const double mhat = m[i] / (1 - std::pow(b1, static_cast<double>(t)));
      const double vhat = v[i] / (1 - std::pow(b2, static_cast<double>(t)));
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

std::vector<float> to_float(const std::vector<double>& d) { return std::vector<float>(d.begin(), d.end()); }

}  // namespace

TEST(AdamWCpu, MatchesDoubleReferenceOverSeveralSteps) {
  const int64_t n = 1000;
  const AdamWConfig configs[] = {{1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f},   // with decoupled weight decay
                                 {1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f},   // torch defaults
                                 {5e-2f, 0.8f, 0.95f, 1e-6f, 0.01f}};  // every field plumbed through
  uint64_t seed = 1;
  for (const AdamWConfig& cfg : configs) {
    SCOPED_TRACE("lr " + std::to_string(cfg.lr) + " wd " + std::to_string(cfg.weight_decay));
    Tensor p = Tensor::uniform({n}, -1.0f, 1.0f, seed++);
    Tensor m = Tensor::zeros({n}, DType::f32), v = Tensor::zeros({n}, DType::f32);
    const std::vector<float> p0 = p.to_f32_vector();
    RefAdamW ref{std::vector<double>(p0.begin(), p0.end()), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
    for (int64_t t = 1; t <= 6; ++t) {
      Tensor g = Tensor::uniform({n}, -1.0f, 1.0f, seed++);
      adamw_step(p, g, m, v, cfg, t);
      ref.step(g.to_f32_vector(), cfg, t);
    }
    // fp32 state vs double: a few fp32 roundings per step.
    EXPECT_TRUE(all_close(p.to_f32_vector(), to_float(ref.p), 1e-6f, 1e-5f)) << "param";
    EXPECT_TRUE(all_close(m.to_f32_vector(), to_float(ref.m), 1e-7f, 1e-5f)) << "m";
    EXPECT_TRUE(all_close(v.to_f32_vector(), to_float(ref.v), 1e-9f, 1e-5f)) << "v";
  }
}

// With zero moments, step 1 moves each parameter by lr·g/(|g| + eps) ≈ lr·sign(g).
TEST(AdamWCpu, FirstStepMovesEachParameterByLr) {
  Tensor p = Tensor::from_f32({0.5f, -0.25f, 2.0f, 0.0f}, {4});
  Tensor g = Tensor::from_f32({3.0f, -1e-3f, -40.0f, 0.0f}, {4});
  Tensor m = Tensor::zeros({4}, DType::f32), v = Tensor::zeros({4}, DType::f32);
  adamw_step(p, g, m, v, AdamWConfig{0.01f}, 1);
  const std::vector<float> got = p.to_f32_vector();
  EXPECT_NEAR(got[0], 0.49f, 1e-6);
  EXPECT_NEAR(got[1], -0.24f, 1e-6);
  EXPECT_NEAR(got[2], 2.01f, 1e-6);
  EXPECT_EQ(got[3], 0.0f);  // zero gradient: no movement
}

// Decoupled weight decay: with a zero gradient the only change is p·(1 − lr·wd), whatever the
// moments (an L2 penalty folded into the gradient would instead move p by ~lr).
TEST(AdamWCpu, WeightDecayIsDecoupledFromTheGradient) {
  Tensor p = Tensor::from_f32({1.0f, -2.0f, 3.0f}, {3});
  Tensor g = Tensor::zeros({3}, DType::f32);
  Tensor m = Tensor::zeros({3}, DType::f32), v = Tensor::zeros({3}, DType::f32);
  AdamWConfig cfg{0.1f};
  cfg.weight_decay = 0.5f;
  adamw_step(p, g, m, v, cfg, 1);
  const float decay = static_cast<float>(1.0 - 0.1f * 0.5);
  EXPECT_EQ(p.to_f32_vector(), (std::vector<float>{1.0f * decay, -2.0f * decay, 3.0f * decay}));
}

TEST(AdamWCpu, RejectsBadArguments) {
  Tensor p = Tensor::zeros({8}, DType::f32), g = Tensor::zeros({8}, DType::f32);
  Tensor m = Tensor::zeros({8}, DType::f32), v = Tensor::zeros({8}, DType::f32);
  const AdamWConfig cfg{1e-3f};
  EXPECT_THROW(adamw_step(p, g, m, v, cfg, 0), Error);  // step is 1-based
  Tensor g7 = Tensor::zeros({7}, DType::f32);
  EXPECT_THROW(adamw_step(p, g7, m, v, cfg, 1), Error);
  Tensor pb = Tensor::zeros({8}, DType::bf16);
  EXPECT_THROW(adamw_step(pb, g, m, v, cfg, 1), Error);
  AdamWConfig bad = cfg;
  bad.beta2 = 1.0f;
  EXPECT_THROW(adamw_step(p, g, m, v, bad, 1), Error);
}

// CPU and CUDA run the same element update (explicit fmaf, IEEE sqrt/div): bit-close, checked with
// atol 1e-7 / rtol 1e-6. n is odd (vector body + scalar tail); the view is 4 bytes off alignment
// (scalar path).
TEST(AdamWCuda, MatchesCpuBitClose) {
  OMNIQ_REQUIRE_CUDA();
  const Device gpu = Device::cuda();
  AdamWConfig cfg{3e-3f};
  cfg.weight_decay = 0.05f;
  for (int64_t n : {int64_t{1}, int64_t{1000003}, int64_t{4096} * 4096}) {
    for (bool unaligned : {false, true}) {
      SCOPED_TRACE("n " + std::to_string(n) + (unaligned ? " unaligned view" : ""));
      const int64_t off = unaligned ? 1 : 0;
      Tensor p_full = Tensor::uniform({n + off}, -1.0f, 1.0f, 7);
      Tensor p = p_full.view_rows(off, n);
      Tensor m = Tensor::zeros({n}, DType::f32), v = Tensor::zeros({n}, DType::f32);
      Tensor pg_full = p_full.to(gpu);
      Tensor pg = pg_full.view_rows(off, n);
      Tensor mg = m.to(gpu), vg = v.to(gpu);
      for (int64_t t = 1; t <= 3; ++t) {
        Tensor g = Tensor::uniform({n}, -1.0f, 1.0f, 100 + t);
        adamw_step(p, g, m, v, cfg, t);
        adamw_step(pg, g.to(gpu), mg, vg, cfg, t);
      }
      EXPECT_TRUE(all_close(pg, p, 1e-7f, 1e-6f)) << "param";
      EXPECT_TRUE(all_close(mg, m, 1e-7f, 1e-6f)) << "m";
      EXPECT_TRUE(all_close(vg, v, 1e-7f, 1e-6f)) << "v";
    }
  }
}

// adamw_step_many == adamw_step on each tensor (own configs, some empty), bit for bit on the CPU,
// and the one-launch CUDA version against the CPU (same element update: atol 1e-7 / rtol 1e-6).
namespace {
struct ManyCase {
  std::vector<Tensor> p, g, m, v;
  std::vector<AdamWConfig> cfg;
};
ManyCase make_many(Device dev) {
  ManyCase c;
  const std::vector<int64_t> sizes = {5, 0, 4096, 11008, 64, 33};
  for (size_t i = 0; i < sizes.size(); ++i) {
    c.p.push_back(Tensor::uniform({sizes[i]}, -1.0f, 1.0f, 10 + i).to(dev));
    c.g.push_back(Tensor::uniform({sizes[i]}, -1.0f, 1.0f, 20 + i).to(dev));
    c.m.push_back(Tensor::zeros({sizes[i]}, DType::f32, dev));
    c.v.push_back(Tensor::zeros({sizes[i]}, DType::f32, dev));
    AdamWConfig cfg{i % 2 ? 5e-3f : 1e-2f};
    cfg.weight_decay = i == 3 ? 0.1f : 0.0f;
    c.cfg.push_back(cfg);
  }
  return c;
}
void step_many(ManyCase& c, int64_t t) {
  std::vector<AdamWParam> ps;
  for (size_t i = 0; i < c.p.size(); ++i) ps.push_back({&c.p[i], &c.g[i], &c.m[i], &c.v[i], c.cfg[i]});
  adamw_step_many(ps, t);
}
}  // namespace

TEST(AdamWCpu, ManyEqualsOneByOne) {
  ManyCase a = make_many(Device::cpu()), b = make_many(Device::cpu());
  for (int64_t t = 1; t <= 3; ++t) {
    step_many(a, t);
    for (size_t i = 0; i < b.p.size(); ++i) adamw_step(b.p[i], b.g[i], b.m[i], b.v[i], b.cfg[i], t);
  }
  for (size_t i = 0; i < a.p.size(); ++i) {
    EXPECT_EQ(a.p[i].to_f32_vector(), b.p[i].to_f32_vector()) << i;
    EXPECT_EQ(a.v[i].to_f32_vector(), b.v[i].to_f32_vector()) << i;
  }
  EXPECT_NE(a.p[2].to_f32_vector(), make_many(Device::cpu()).p[2].to_f32_vector());  // it moved
}

TEST(AdamWCuda, ManyMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  ManyCase a = make_many(Device::cpu()), b = make_many(Device::cuda());
  for (int64_t t = 1; t <= 3; ++t) {
    step_many(a, t);
    step_many(b, t);
  }
  for (size_t i = 0; i < a.p.size(); ++i) {
    EXPECT_TRUE(all_close(b.p[i].to(Device::cpu()), a.p[i], 1e-7f, 1e-6f)) << i;
    EXPECT_TRUE(all_close(b.m[i].to(Device::cpu()), a.m[i], 1e-7f, 1e-6f)) << i;
  }
}

namespace {
// The indirect form: scalars for step t written into a device buffer before each launch.
void step_many_indirect(ManyCase& c, int64_t t, Tensor& scalars) {
  std::vector<AdamWParam> ps;
  for (size_t i = 0; i < c.p.size(); ++i) ps.push_back({&c.p[i], &c.g[i], &c.m[i], &c.v[i], c.cfg[i]});
  std::vector<float> f = adamw_scalar_floats(c.cfg, t);
  scalars.copy_from(Tensor::from_f32(f, {static_cast<int64_t>(f.size())}, DType::f32, scalars.device()));
  adamw_step_many_indirect(ps, scalars);
}
}  // namespace

TEST(AdamWCuda, IndirectScalarsGiveTheSameBitsAsMany) {
  OMNIQ_REQUIRE_CUDA();
  ManyCase a = make_many(Device::cuda()), b = make_many(Device::cuda());
  Tensor scalars = Tensor::zeros({static_cast<int64_t>(b.p.size()) * 7}, DType::f32, Device::cuda());
  for (int64_t t = 1; t <= 3; ++t) {
    step_many(a, t);
    step_many_indirect(b, t, scalars);
  }
  for (size_t i = 0; i < a.p.size(); ++i) {
    EXPECT_EQ(a.p[i].to_f32_vector(), b.p[i].to_f32_vector()) << i;
    EXPECT_EQ(a.m[i].to_f32_vector(), b.m[i].to_f32_vector()) << i;
    EXPECT_EQ(a.v[i].to_f32_vector(), b.v[i].to_f32_vector()) << i;
  }
}

#ifdef OMNIQ_HAS_CUDA
// One captured launch replayed for steps 2 and 3 after rewriting the scalars: the same bits as
// launching each step (the bias corrections are not frozen into the graph).
TEST(AdamWCuda, GraphReplayReadsEachStepsScalars) {
  OMNIQ_REQUIRE_CUDA();
  ManyCase a = make_many(Device::cuda()), b = make_many(Device::cuda());
  Tensor scalars = Tensor::zeros({static_cast<int64_t>(b.p.size()) * 7}, DType::f32, Device::cuda());
  std::vector<AdamWParam> ps;
  for (size_t i = 0; i < b.p.size(); ++i) ps.push_back({&b.p[i], &b.g[i], &b.m[i], &b.v[i], b.cfg[i]});
  CudaGraph graph;
  std::string why;
  ASSERT_TRUE(graph.capture(0, [&] { adamw_step_many_indirect(ps, scalars); }, &why)) << why;
  for (int64_t t = 1; t <= 3; ++t) {
    step_many(a, t);
    std::vector<float> f = adamw_scalar_floats(b.cfg, t);
    Tensor host = Tensor::from_f32(f, {static_cast<int64_t>(f.size())}, DType::f32, Device::cuda());
    scalars.copy_from(host);
    graph.launch();
  }
  for (size_t i = 0; i < a.p.size(); ++i) EXPECT_EQ(a.p[i].to_f32_vector(), b.p[i].to_f32_vector()) << i;
  EXPECT_NE(a.p[2].to_f32_vector(), make_many(Device::cuda()).p[2].to_f32_vector());  // it moved
}

#endif

TEST(AdamWCpu, IndirectNeedsSevenFloatsPerTensorOnTheDevice) {
  ManyCase c = make_many(Device::cpu());
  std::vector<AdamWParam> ps;
  for (size_t i = 0; i < c.p.size(); ++i) ps.push_back({&c.p[i], &c.g[i], &c.m[i], &c.v[i], c.cfg[i]});
  Tensor wrong = Tensor::zeros({5}, DType::f32, Device::cpu());
  EXPECT_THROW(adamw_step_many_indirect(ps, wrong), Error);
  Tensor on_cpu = Tensor::zeros({static_cast<int64_t>(ps.size()) * 7}, DType::f32, Device::cpu());
  EXPECT_THROW(adamw_step_many_indirect(ps, on_cpu), Error);
  EXPECT_EQ(adamw_scalar_floats(c.cfg, 1).size(), c.cfg.size() * 7);
}
