// Attention (GQA) and the causal softmax: CPU vs an independent naive reference (explicit
// repeat_kv, -inf masking), finite-difference checks of every backward, and CUDA vs CPU.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::all_close;

struct Cfg {
  int64_t B, T, Hq, Hkv, D;
  bool causal;
};

std::ostream& operator<<(std::ostream& os, const Cfg& c) {
  return os << "B=" << c.B << " T=" << c.T << " Hq=" << c.Hq << " Hkv=" << c.Hkv << " D=" << c.D
            << (c.causal ? " causal" : " full");
}

// Naive attention in double: expand k/v to Hq heads (repeat_kv), full score matrix with -inf above
// the diagonal when causal, softmax, P·V. Returns out [B,T,Hq,D] and lse [B,Hq,T].
struct NaiveAttn {
  std::vector<double> out, lse;
};
NaiveAttn naive_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                          const Cfg& c, float scale) {
  const int64_t G = c.Hq / c.Hkv;
  std::vector<float> kr(q.size()), vr(q.size());  // repeat_kv
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.Hq; ++h)
        for (int64_t d = 0; d < c.D; ++d) {
          const int64_t src = ((b * c.T + t) * c.Hkv + h / G) * c.D + d, dst = ((b * c.T + t) * c.Hq + h) * c.D + d;
          kr[dst] = k[src], vr[dst] = v[src];
        }
  auto at = [&](int64_t b, int64_t t, int64_t h) { return ((b * c.T + t) * c.Hq + h) * c.D; };
  NaiveAttn r;
  r.out.assign(q.size(), 0.0);
  r.lse.assign(static_cast<size_t>(c.B * c.Hq * c.T), 0.0);
  std::vector<double> s(static_cast<size_t>(c.T));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.T; ++i) {
        for (int64_t j = 0; j < c.T; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += static_cast<double>(q[at(b, i, h) + d]) * kr[at(b, j, h) + d];
          s[j] = (c.causal && j > i) ? -std::numeric_limits<double>::infinity() : scale * dot;
        }
        const double m = *std::max_element(s.begin(), s.end());
        double l = 0;
        for (double x : s) l += std::exp(x - m);
        for (int64_t j = 0; j < c.T; ++j) {
          const double p = std::exp(s[j] - m) / l;
          for (int64_t d = 0; d < c.D; ++d) r.out[at(b, i, h) + d] += p * vr[at(b, j, h) + d];
        }
        r.lse[(b * c.Hq + h) * c.T + i] = m + std::log(l);
      }
  return r;
}

// Naive causal softmax of scale·s over [rows, T] in double.
std::vector<double> naive_softmax(const std::vector<float>& s, int64_t T, float scale) {
  std::vector<double> p(s.size(), 0.0);
  for (size_t r = 0; r < s.size() / T; ++r) {
    const int64_t i = static_cast<int64_t>(r) % T;
    double m = -std::numeric_limits<double>::infinity(), l = 0;
    for (int64_t j = 0; j <= i; ++j) m = std::max(m, static_cast<double>(scale) * s[r * T + j]);
    for (int64_t j = 0; j <= i; ++j) l += std::exp(static_cast<double>(scale) * s[r * T + j] - m);
    for (int64_t j = 0; j <= i; ++j) p[r * T + j] = std::exp(static_cast<double>(scale) * s[r * T + j] - m) / l;
  }
  return p;
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

// 16-bit comparisons: absolute tolerance relative to the largest reference value, because
// gradients like dS = P ⊙ (dP − δ) cancel and small entries carry the rounding of large ones.
::testing::AssertionResult close_scaled(const Tensor& got, const Tensor& ref, float rel) {
  const auto r = ref.to(Device::cpu()).to_f32_vector();
  return all_close(got.to(Device::cpu()).to_f32_vector(), r, rel * max_abs(r), rel);
}

struct Inputs {
  Tensor q, k, v;
};
Inputs make_inputs(const Cfg& c, uint64_t seed, DType dt = DType::f32, Device dev = Device::cpu()) {
  return {Tensor::uniform(Shape{c.B, c.T, c.Hq, c.D}, -1, 1, seed, dt, dev),
          Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 1, dt, dev),
          Tensor::uniform(Shape{c.B, c.T, c.Hkv, c.D}, -1, 1, seed + 2, dt, dev)};
}

const std::vector<Cfg> kSmallCfgs = {
    {2, 5, 4, 2, 8, true},   // GQA, causal
    {2, 5, 4, 2, 8, false},  // GQA, full
    {1, 6, 3, 3, 4, true},   // MHA
    {2, 4, 4, 1, 5, true},   // MQA, odd D
    {1, 1, 2, 1, 3, true},   // a single token
};

// ---------------------------------------------------------------------------------------------
// CPU

TEST(AttentionCpu, ForwardMatchesNaive) {
  for (const Cfg& c : kSmallCfgs) {
    SCOPED_TRACE(testing::Message() << c);
    Inputs in = make_inputs(c, 10);
    const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
    Tensor lse;
    Tensor out = attention_forward(in.q, in.k, in.v, scale, c.causal, &lse);
    ASSERT_EQ(out.shape(), in.q.shape());
    ASSERT_EQ(lse.shape(), (Shape{c.B, c.Hq, c.T}));
    ASSERT_EQ(lse.dtype(), DType::f32);
    const NaiveAttn ref = naive_attention(in.q.to_f32_vector(), in.k.to_f32_vector(), in.v.to_f32_vector(), c, scale);
    EXPECT_TRUE(all_close(out.to_f32_vector(), to_float(ref.out), 1e-6f, 1e-5f));
    EXPECT_TRUE(all_close(lse.to_f32_vector(), to_float(ref.lse), 1e-6f, 1e-5f));
  }
  // Without lse_out, and in bf16 (output rounded once).
  const Cfg c{2, 5, 4, 2, 8, true};
  Inputs in = make_inputs(c, 20, DType::bf16);
  Tensor out = attention_forward(in.q, in.k, in.v, 0.3f, true, nullptr);
  EXPECT_EQ(out.dtype(), DType::bf16);
  const NaiveAttn ref = naive_attention(in.q.to_f32_vector(), in.k.to_f32_vector(), in.v.to_f32_vector(), c, 0.3f);
  EXPECT_TRUE(all_close(out.to_f32_vector(), to_float(ref.out), 1e-3f, 1e-2f));
}

void check_attention_fd(const Cfg& c) {
  SCOPED_TRACE(testing::Message() << c);
  Inputs in = make_inputs(c, 30);
  const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
  Tensor dout = Tensor::uniform(in.q.shape(), -1, 1, 33);
  Tensor lse;
  Tensor out = attention_forward(in.q, in.k, in.v, scale, c.causal, &lse);
  AttentionGrads g = attention_backward(dout, in.q, in.k, in.v, out, lse, scale, c.causal);
  ASSERT_EQ(g.dq.shape(), in.q.shape());
  ASSERT_EQ(g.dk.shape(), in.k.shape());
  ASSERT_EQ(g.dv.shape(), in.v.shape());
  const auto G = dout.to_f32_vector();
  // f = Σ dout ⊙ attention(q, k, v) in double from the tensors' current values.
  auto f = [&]() {
    const NaiveAttn a = naive_attention(in.q.to_f32_vector(), in.k.to_f32_vector(), in.v.to_f32_vector(), c, scale);
    double s = 0;
    for (size_t i = 0; i < a.out.size(); ++i) s += G[i] * a.out[i];
    return s;
  };
  EXPECT_TRUE(test::check_gradient(in.q, f, g.dq, 1e-3, 1e-4, 1e-2, 200));
  EXPECT_TRUE(test::check_gradient(in.k, f, g.dk, 1e-3, 1e-4, 1e-2, 200));
  EXPECT_TRUE(test::check_gradient(in.v, f, g.dv, 1e-3, 1e-4, 1e-2, 200));
}

TEST(AttentionCpu, BackwardFiniteDifferencesGqa) { check_attention_fd({2, 5, 4, 2, 8, true}); }
TEST(AttentionCpu, BackwardFiniteDifferencesNonCausal) { check_attention_fd({2, 5, 4, 2, 8, false}); }
TEST(AttentionCpu, BackwardFiniteDifferencesMhaAndMqa) {
  check_attention_fd({1, 6, 3, 3, 4, true});
  check_attention_fd({1, 4, 4, 1, 5, true});
}

TEST(AttentionCpu, CausalSoftmaxMatchesNaive) {
  const int64_t T = 7;
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor s = Tensor::uniform(Shape{2, 3, T, T}, -3, 3, 40, dt);
    Tensor p = causal_softmax_forward(s, 0.5f);
    ASSERT_EQ(p.shape(), s.shape());
    ASSERT_EQ(p.dtype(), dt);
    const auto pv = p.to_f32_vector();
    EXPECT_TRUE(all_close(pv, to_float(naive_softmax(s.to_f32_vector(), T, 0.5f)), dt == DType::f32 ? 1e-6f : 1e-3f,
                          dt == DType::f32 ? 1e-5f : 1e-2f));
    for (int64_t r = 0; r < 6 * T; ++r)
      for (int64_t j = r % T + 1; j < T; ++j) EXPECT_EQ(pv[r * T + j], 0.f) << "masked entry " << r << "," << j;
  }
}

TEST(AttentionCpu, CausalSoftmaxBackwardFiniteDifferences) {
  const int64_t T = 6;
  const float scale = 0.7f;
  Tensor s = Tensor::uniform(Shape{2, T, T}, -2, 2, 50);
  Tensor dp = Tensor::uniform(Shape{2, T, T}, -1, 1, 51);
  Tensor p = causal_softmax_forward(s, scale);
  Tensor ds = causal_softmax_backward(dp, p, scale);
  const auto G = dp.to_f32_vector();
  auto f = [&]() {
    const auto pr = naive_softmax(s.to_f32_vector(), T, scale);
    double acc = 0;
    for (size_t i = 0; i < pr.size(); ++i) acc += G[i] * pr[i];
    return acc;
  };
  EXPECT_TRUE(test::check_gradient(s, f, ds, 1e-3, 1e-4, 1e-2, 200));
}

TEST(AttentionCpu, RejectsBadArguments) {
  Tensor q = Tensor::uniform(Shape{1, 4, 3, 8}, -1, 1, 1);
  Tensor k = Tensor::uniform(Shape{1, 4, 2, 8}, -1, 1, 2);  // 3 % 2 != 0
  EXPECT_THROW(attention_forward(q, k, k, 1.f, true, nullptr), Error);
  Tensor q4 = Tensor::uniform(Shape{1, 4, 4, 8}, -1, 1, 3);
  Tensor kd = Tensor::uniform(Shape{1, 4, 2, 6}, -1, 1, 4);  // D mismatch
  EXPECT_THROW(attention_forward(q4, kd, kd, 1.f, true, nullptr), Error);
  EXPECT_THROW(attention_forward(q4, k.to(DType::bf16), k.to(DType::bf16), 1.f, true, nullptr), Error);
  Tensor lse;
  Tensor out = attention_forward(q4, k, k, 1.f, true, &lse);
  Tensor bad_lse = Tensor::zeros(Shape{1, 4, 4}, DType::bf16);
  EXPECT_THROW(attention_backward(out, q4, k, k, out, bad_lse, 1.f, true), Error);
  EXPECT_THROW(causal_softmax_forward(Tensor::zeros(Shape{2, 3, 4}, DType::f32), 1.f), Error);  // not square
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

const std::vector<Cfg> kCudaCfgs = {
    {2, 37, 4, 2, 16, true},    // GQA, odd T
    {2, 37, 4, 2, 16, false},   // GQA, full attention
    {2, 256, 8, 2, 64, true},   // the "large-ish" case
    {1, 128, 4, 4, 128, true},  // MHA, D = 128
    {1, 64, 4, 1, 64, true},    // MQA
    {1, 300, 2, 1, 8, true},    // T > 256: rows longer than one pass of a 256-thread block
};

// f32: both sides are fp32-exact up to summation order: atol 5e-5 rtol 1e-4 (lse 1e-4).
TEST(AttentionCuda, ForwardF32MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const Cfg& c : kCudaCfgs) {
    SCOPED_TRACE(testing::Message() << c);
    Inputs in = make_inputs(c, 100);
    const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
    Tensor lse_ref, lse;
    Tensor ref = attention_forward(in.q, in.k, in.v, scale, c.causal, &lse_ref);
    Inputs d{in.q.to(Device::cuda()), in.k.to(Device::cuda()), in.v.to(Device::cuda())};
    Tensor out = attention_forward(d.q, d.k, d.v, scale, c.causal, &lse);
    ASSERT_EQ(out.shape(), ref.shape());
    EXPECT_TRUE(all_close(out.to(Device::cpu()), ref, 5e-5f, 1e-4f));
    EXPECT_TRUE(all_close(lse.to(Device::cpu()), lse_ref, 1e-4f, 1e-4f));
  }
}

// bf16/f16: the CPU reference runs on the same rounded inputs; CUDA additionally rounds P to 16 bits
// before P·V, so compare with rtol 2e-2 and atol 2e-2·max|ref|. lse stays fp32 on both sides.
TEST(AttentionCuda, ForwardBf16F16MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::bf16, DType::f16})
    for (const Cfg& c : kCudaCfgs) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " " << c);
      Inputs in = make_inputs(c, 200, dt);
      const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
      Tensor lse_ref, lse;
      Tensor ref = attention_forward(in.q, in.k, in.v, scale, c.causal, &lse_ref);
      Tensor out = attention_forward(in.q.to(Device::cuda()), in.k.to(Device::cuda()), in.v.to(Device::cuda()),
                                     scale, c.causal, &lse);
      ASSERT_EQ(out.dtype(), dt);
      EXPECT_TRUE(close_scaled(out, ref, 2e-2f));
      EXPECT_TRUE(all_close(lse.to(Device::cpu()), lse_ref, 1e-3f, 1e-3f));
    }
}

// Each backend's backward is fed the same out/lse (CUDA's forward, copied to the CPU) so the
// comparison isolates the backward. f32: atol 1e-4·max rtol 1e-3; bf16: 3e-2 scaled (P and dS are
// rounded to bf16 before their GEMMs).
void check_backward_cuda(DType dt, const Cfg& c, float rel) {
  SCOPED_TRACE(testing::Message() << dtype_name(dt) << " " << c);
  Inputs in = make_inputs(c, 300, dt);
  Tensor dout = Tensor::uniform(in.q.shape(), -1, 1, 303, dt);
  const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
  Inputs d{in.q.to(Device::cuda()), in.k.to(Device::cuda()), in.v.to(Device::cuda())};
  Tensor dout_d = dout.to(Device::cuda());
  Tensor lse_d;
  Tensor out_d = attention_forward(d.q, d.k, d.v, scale, c.causal, &lse_d);
  AttentionGrads got = attention_backward(dout_d, d.q, d.k, d.v, out_d, lse_d, scale, c.causal);
  AttentionGrads ref = attention_backward(dout, in.q, in.k, in.v, out_d.to(Device::cpu()), lse_d.to(Device::cpu()),
                                          scale, c.causal);
  ASSERT_EQ(got.dq.dtype(), dt);
  ASSERT_EQ(got.dk.shape(), in.k.shape());
  EXPECT_TRUE(close_scaled(got.dq, ref.dq, rel)) << "dq";
  EXPECT_TRUE(close_scaled(got.dk, ref.dk, rel)) << "dk";
  EXPECT_TRUE(close_scaled(got.dv, ref.dv, rel)) << "dv";
}

TEST(AttentionCuda, BackwardF32MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const Cfg& c : kCudaCfgs) check_backward_cuda(DType::f32, c, 1e-4f);
}

TEST(AttentionCuda, BackwardBf16F16MatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const Cfg& c : kCudaCfgs) check_backward_cuda(DType::bf16, c, 3e-2f);
  check_backward_cuda(DType::f16, kCudaCfgs[0], 1e-2f);
}

// The size the models run at: T = 2048, D = 128, bf16, GQA.
TEST(AttentionCuda, LongSequenceBf16) {
  OMNIQ_REQUIRE_CUDA();
  const Cfg c{1, 2048, 2, 1, 128, true};
  SCOPED_TRACE(testing::Message() << c);
  Inputs in = make_inputs(c, 400, DType::bf16);
  const float scale = 1.f / std::sqrt(128.f);
  Tensor lse_ref, lse;
  Tensor ref = attention_forward(in.q, in.k, in.v, scale, true, &lse_ref);
  Tensor out = attention_forward(in.q.to(Device::cuda()), in.k.to(Device::cuda()), in.v.to(Device::cuda()), scale,
                                 true, &lse);
  EXPECT_TRUE(close_scaled(out, ref, 2e-2f));
  EXPECT_TRUE(all_close(lse.to(Device::cpu()), lse_ref, 1e-3f, 1e-3f));
  check_backward_cuda(DType::bf16, c, 3e-2f);
}

TEST(AttentionCuda, CausalSoftmaxMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Shape& sh : {Shape{2, 3, 37, 37}, Shape{1, 2, 300, 300}, Shape{1, 1}}) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " " << sh.str());
      const float scale = 0.6f;
      Tensor s = Tensor::uniform(sh, -4, 4, 500, dt);
      Tensor dp = Tensor::uniform(sh, -1, 1, 501, dt);
      Tensor p_ref = causal_softmax_forward(s, scale);
      Tensor p = causal_softmax_forward(s.to(Device::cuda()), scale);
      // f32: 1e-6 abs / 1e-5 rel; bf16: one output rounding, 1e-2 rel.
      const float atol = dt == DType::f32 ? 1e-6f : 1e-3f, rtol = dt == DType::f32 ? 1e-5f : 1e-2f;
      EXPECT_TRUE(all_close(p.to(Device::cpu()), p_ref, atol, rtol));
      // Backward on identical probs (the CPU's), so only the backward differs.
      Tensor ds_ref = causal_softmax_backward(dp, p_ref, scale);
      Tensor ds = causal_softmax_backward(dp.to(Device::cuda()), p_ref.to(Device::cuda()), scale);
      EXPECT_TRUE(close_scaled(ds, ds_ref, dt == DType::f32 ? 1e-5f : 2e-2f));
    }
}

}  // namespace
}  // namespace omniq
