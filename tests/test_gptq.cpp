// GPTQ (quant/gptq.h): beats RTN (same quantizer) on the layer-wise objective ‖WX − ŴX‖² for every
// Linear of real nano blocks (per layer on fp inputs, and through the sequential block driver),
// equals RTN exactly when H is diagonal (both range rules: the original GPTQ quantizer checked
// against an independent implementation, fake_quant's bit for bit), matches a hand derivation on a
// 2×4 case, handles dead inputs, supports LWC clip factors (OmniQuant-then-GPTQ), and the CUDA path
// agrees with the CPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "autograd/tape.h"
#include "models/causal_lm.h"
#include "models/checkpoint.h"
#include "models/datasets.h"
#include "models/tokenizer.h"
#include "ops/fake_quant.h"
#include "ops/matmul.h"
#include "quant/gptq.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

std::string nano(const char* arch) { return test::source_path(std::string("data/models/") + arch + "-nano"); }

// Block-0 hidden states of N consecutive T-token windows of WikiText: [N, T, C].
Tensor block_inputs(const ModelCheckpoint& ck, int64_t N, int64_t T) {
  Tokenizer tok = Tokenizer::from_model_dir(ck.dir());
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  NamedWeights emb = ck.load_embeddings(DType::f32, Device::cpu());
  Tensor out = Tensor::empty({N, T, ck.config().hidden_size}, DType::f32);
  for (int64_t j = 0; j < N; ++j) {
    std::vector<int32_t> w(ids.begin() + j * T, ids.begin() + (j + 1) * T);
    out.view_rows(j, 1).copy_from(embed_tokens(ck.config(), emb, Tensor::from_i32(w, {1, T}), Device::cpu()));
  }
  return out;
}

// Captures every Linear's input ([rows, in], all samples concatenated, on the CPU).
struct InputCapture : BlockHooks {
  std::map<std::string, std::vector<float>> xs;
  std::map<std::string, int64_t> cols;
  ag::Var activation(ag::Tape&, const std::string& s, const ag::Var& x) override {
    if (s == "q" || s == "k" || s == "v") return x;
    std::vector<float> v = x->value.to_f32_vector();
    xs[s].insert(xs[s].end(), v.begin(), v.end());
    cols[s] = x->value.cols();
    return x;
  }
  Tensor x(const std::string& s) const {
    int64_t c = cols.at(s);
    return Tensor::from_f32(xs.at(s), {static_cast<int64_t>(xs.at(s).size()) / c, c});
  }
};

InputCapture capture_inputs(const ModelConfig& cfg, const BlockWeights& w, const Tensor& inps) {
  InputCapture cap;
  auto params = block_params(w);
  for (int64_t j = 0; j < inps.size(0); ++j) {
    ag::Tape t;
    decoder_block_forward(t, cfg, params, ag::constant(inps.view_rows(j, 1)), &cap);
  }
  return cap;
}

// ‖X Wᵀ − X Ŵᵀ‖² (all on the CPU, accumulated in double).
double layer_error(const Tensor& X, const Tensor& W, const Tensor& Wq) {
  std::vector<float> a = W.to_f32_vector(), b = Wq.to_f32_vector();
  for (size_t i = 0; i < a.size(); ++i) a[i] -= b[i];
  Tensor y = linear_forward(X, Tensor::from_f32(a, W.shape()));
  double s = 0;
  for (float v : y.to_f32_vector()) s += static_cast<double>(v) * v;
  return s;
}

Tensor hessian_of(const Tensor& X) {
  Tensor H;
  int64_t n = 0;
  gptq_accumulate_hessian(H, n, X);
  return H;
}

Tensor rtn(const Tensor& w, const WeightQuantSpec& s) { return fake_quant_weight_forward(w, s, nullptr, nullptr); }

Tensor eye(int64_t n, Device dev = Device::cpu()) {
  std::vector<float> e(static_cast<size_t>(n * n), 0.f);
  for (int64_t i = 0; i < n; ++i) e[static_cast<size_t>(i * n + i)] = 1.f;
  return Tensor::from_f32(e, {n, n}, DType::f32, dev);
}

// RTN with GPTQ's quantizer (opt's range rule, optional clip): GPTQ with H = I has no error feedback.
// Checked against independent implementations in DiagonalHessianEqualsRtnExactly.
Tensor rtn_gptq(const Tensor& w, const WeightQuantSpec& s, const GptqOptions& opt, const GptqClip* clip = nullptr) {
  return gptq_quantize_linear(w, eye(w.size(1), w.device()), s, opt, clip);
}

// The original GPTQ quantizer (quant.py Quantizer.find_params + quantize, mse off), written
// independently of quant/gptq.cpp, applied per group of g columns (g = 0: per row).
std::vector<float> rtn_original(const std::vector<float>& w, int64_t out, int64_t in, int bits, int g, bool sym) {
  const int64_t len = g > 0 ? g : in;
  const float maxq = static_cast<float>((1 << bits) - 1);
  std::vector<float> y(w.size());
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c0 = 0; c0 < in; c0 += len) {
      const float* x = &w[static_cast<size_t>(r * in + c0)];
      float xmin = std::min(0.f, *std::min_element(x, x + len)), xmax = std::max(0.f, *std::max_element(x, x + len));
      if (sym) {
        xmax = std::max(std::fabs(xmin), xmax);
        xmin = -xmax;  // (the original only mirrors a negative xmin: quant/gptq.h (*))
      }
      if (xmin == 0.f && xmax == 0.f) {
        xmin = -1.f;
        xmax = 1.f;
      }
      const float scale = (xmax - xmin) / maxq;
      const float zero = sym ? (maxq + 1) / 2 : std::rint(-xmin / scale);
      for (int64_t i = 0; i < len; ++i) {
        const float q = std::min(std::max(std::rint(x[i] / scale) + zero, 0.f), maxq);
        y[static_cast<size_t>(r * in + c0 + i)] = scale * (q - zero);
      }
    }
  return y;
}

// Clip factors in [lo, 1] for every quantization group of w (and the LWC γ/β that give them).
GptqClip random_clip(const Tensor& w, const WeightQuantSpec& spec, float lo, uint64_t seed) {
  const int64_t n = spec.num_groups(w.size(0), w.size(1));
  return gptq_clip_from_factors(Tensor::uniform({n}, lo, 1.f, seed), Tensor::uniform({n}, lo, 1.f, seed + 1));
}

WeightQuantSpec spec_of(int bits, int group, bool sym = false) {
  WeightQuantSpec s;
  s.bits = bits;
  s.group_size = group;
  s.symmetric = sym;
  return s;
}

// Every Linear of block 1, quantized on its own fp input: GPTQ must beat RTN on that input.
void check_per_layer(const char* arch, const WeightQuantSpec& spec, const GptqOptions& opt) {
  ModelCheckpoint ck(nano(arch));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  InputCapture cap = capture_inputs(cfg, w, block_inputs(ck, 4, 128));
  for (const std::string& s : block_linear_sites(cfg)) {
    Tensor X = cap.x(s);
    const Tensor& W = w.get(s + ".weight");
    double eg = layer_error(X, W, gptq_quantize_linear(W, hessian_of(X), spec, opt));
    double er = layer_error(X, W, rtn_gptq(W, spec, opt));
    std::printf("%s W%dg%d act_order=%d static=%d %-9s gptq/rtn = %.3f\n", arch, spec.bits, spec.group_size,
                opt.act_order, opt.static_groups, s.c_str(), eg / er);
    EXPECT_LT(eg, er) << arch << " " << s;
  }
}

// The sequential driver: after gptq_quantize_block, each Linear's input in the quantized block is
// exactly what its Hessian was built from; on that input GPTQ must beat RTN of the same weight.
void check_block(const char* arch, const WeightQuantSpec& spec) {
  ModelCheckpoint ck(nano(arch));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  BlockWeights q = ck.load_block(1, DType::f32, Device::cpu());
  Tensor inps = block_inputs(ck, 4, 128);
  gptq_quantize_block(cfg, q, inps, spec, GptqOptions{});
  InputCapture cap = capture_inputs(cfg, q, inps);
  for (const std::string& s : block_linear_sites(cfg)) {
    Tensor X = cap.x(s);
    const Tensor& W = w.get(s + ".weight");
    double eg = layer_error(X, W, q.get(s + ".weight"));
    double er = layer_error(X, W, rtn_gptq(W, spec, GptqOptions{}));
    std::printf("%s block W%dg%d %-9s gptq/rtn = %.3f\n", arch, spec.bits, spec.group_size, s.c_str(), eg / er);
    EXPECT_LT(eg, er) << arch << " " << s;
  }
}

}  // namespace

TEST(Gptq, BeatsRtnPerLayerW3PerChannel) {
  check_per_layer("llama", spec_of(3, 0), GptqOptions{});
  check_per_layer("opt", spec_of(3, 0), GptqOptions{});
}

TEST(Gptq, BeatsRtnPerLayerW4G128) {
  check_per_layer("llama", spec_of(4, 128), GptqOptions{});
  check_per_layer("opt", spec_of(4, 128), GptqOptions{});
}

TEST(Gptq, BeatsRtnSequentialBlock) {
  for (const char* arch : {"llama", "opt"}) {
    check_block(arch, spec_of(3, 0));
    check_block(arch, spec_of(4, 128));
  }
}

TEST(Gptq, ActOrderAndStaticGroupsBeatRtn) {
  GptqOptions a;
  a.act_order = true;
  check_per_layer("llama", spec_of(3, 0), a);
  check_per_layer("llama", spec_of(4, 128), a);
  GptqOptions s;
  s.static_groups = true;
  check_per_layer("opt", spec_of(4, 64), s);
  s.act_order = true;
  check_per_layer("llama", spec_of(4, 64), s);
  check_per_layer("opt", spec_of(3, 128), s);
}

TEST(Gptq, EightBitIsCloseToRtnAndW) {
  Tensor w = Tensor::uniform({32, 64}, -1, 1, 3);
  Tensor X = Tensor::uniform({256, 64}, -1, 1, 4);
  Tensor g = gptq_quantize_linear(w, hessian_of(X), spec_of(8, 0), GptqOptions{});
  Tensor r = rtn_gptq(w, spec_of(8, 0), GptqOptions{});
  // One 8-bit step is 2/255 ≈ 0.008; error feedback moves a value by at most a few steps.
  EXPECT_TRUE(test::all_close(g, w, 0.02f, 0.f));
  EXPECT_TRUE(test::all_close(g, r, 0.03f, 0.f));
  EXPECT_LT(layer_error(X, w, g), layer_error(X, w, r));
}

// With a diagonal H every off-diagonal of U is 0: no error feedback, so GPTQ is RTN bit for bit
// (also with act_order when the groups are static, and for any block size): with
// range_contains_zero = false it is fake_quant's RTN, by default the original GPTQ quantizer's.
// w in [-2, 1] with groups of 8: some groups are all negative, where the two rules differ.
TEST(Gptq, DiagonalHessianEqualsRtnExactly) {
  Tensor w = Tensor::uniform({8, 32}, -2, 1, 11);
  std::vector<float> diag(32 * 32, 0.f);
  std::vector<float> d = Tensor::uniform({32}, 0.1f, 5.f, 12).to_f32_vector();
  for (int i = 0; i < 32; ++i) diag[i * 33] = d[static_cast<size_t>(i)];
  for (auto spec : {spec_of(4, 0), spec_of(3, 8), spec_of(4, 16, true), spec_of(2, 32), spec_of(3, 8, true)}) {
    for (const Tensor& Ht : {eye(32), Tensor::from_f32(diag, {32, 32})}) {
      for (bool act : {false, true}) {
        GptqOptions o;
        o.block_size = 5;
        o.act_order = o.static_groups = act;
        std::vector<float> orig = rtn_original(w.to_f32_vector(), 8, 32, spec.bits, spec.group_size, spec.symmetric);
        EXPECT_TRUE(test::all_close(gptq_quantize_linear(w, Ht, spec, o).to_f32_vector(), orig, 0.f, 0.f));
        o.range_contains_zero = false;
        EXPECT_TRUE(test::all_close(gptq_quantize_linear(w, Ht, spec, o), rtn(w, spec), 0.f, 0.f));
      }
    }
  }
  // The rules really differ here (the test can fail): an all-negative group of 8 exists.
  EXPECT_GT(test::max_abs_diff(rtn(w, spec_of(3, 8)).to_f32_vector(),
                               rtn_original(w.to_f32_vector(), 8, 32, 3, 8, false)),
            1e-3f);
}

// The original quantizer's corners: a positive-only row keeps 0 representable (zp = 0), an all-zero
// row quantizes to 0 (range [-1, 1]), symmetric uses scale 2·max|x|/(2^N − 1) on levels -2^(N-1)..2^(N-1)-1.
TEST(Gptq, OriginalQuantizerCorners) {
  const std::vector<float> W = {0.5f, 1.0f, 0.75f, 0.9f, 0.f, 0.f, 0.f, 0.f, -0.6f, 0.3f, 0.1f, -0.2f};
  const Tensor w = Tensor::from_f32(W, {3, 4});
  std::vector<float> a = rtn_gptq(w, spec_of(3, 0), GptqOptions{}).to_f32_vector();
  const float s1 = 1.f / 7.f;  // row 0: range [0, 1], zp 0
  for (int i = 0; i < 4; ++i) EXPECT_EQ(a[i], std::rint(W[i] / s1) * s1) << i;
  for (int i = 4; i < 8; ++i) EXPECT_EQ(a[i], 0.f);
  std::vector<float> b = rtn_gptq(w, spec_of(3, 0, true), GptqOptions{}).to_f32_vector();
  const float s = (0.6f + 0.6f) / 7.f;  // row 2: m = 0.6
  for (int i = 8; i < 12; ++i)
    EXPECT_EQ(b[i], std::min(std::max(std::rint(W[i] / s), -4.f), 3.f) * s) << i;
}

// 2×4 weight, H block-diagonal with 2×2 blocks [[a, b], [b, c]], no dampening, per-channel W3.
// Quantizing column 0 with error δ0 = w0 − q0, the remaining error ‖δ‖²_H is minimised by
// w1' = w1 + δ0·b/c (set ∂/∂δ1 of a δ0² + 2b δ0 δ1 + c δ1² to 0); columns 2, 3 likewise, and the
// blocks do not interact.
TEST(Gptq, HandDerivedTwoByFour) {
  const std::vector<float> W = {0.31f, 0.10f, 0.55f, -0.72f, -0.43f, 0.27f, 0.91f, -0.66f};
  const float a1 = 2.0f, b1 = 0.8f, c1 = 1.5f, a2 = 1.0f, b2 = -0.4f, c2 = 0.9f;
  std::vector<float> H = {a1, b1, 0, 0, b1, c1, 0, 0, 0, 0, a2, b2, 0, 0, b2, c2};
  auto quant = [](float x, float mn, float mx) {  // omniq RTN at 3 bits, asymmetric
    float scale = std::min(std::max((mx - mn) / 7.0f, 1e-5f), 1e4f);
    float zp = std::rint(-mn / scale);
    float q = std::min(std::max(std::rint(x / scale) + zp, 0.0f), 7.0f);
    return (q - zp) * scale;
  };
  std::vector<float> expect(8);
  for (int r = 0; r < 2; ++r) {
    const float* w = &W[static_cast<size_t>(r * 4)];
    float mn = *std::min_element(w, w + 4), mx = *std::max_element(w, w + 4);
    float* e = &expect[static_cast<size_t>(r * 4)];
    e[0] = quant(w[0], mn, mx);
    e[1] = quant(w[1] + (w[0] - e[0]) * b1 / c1, mn, mx);
    e[2] = quant(w[2], mn, mx);
    e[3] = quant(w[3] + (w[2] - e[2]) * b2 / c2, mn, mx);
  }
  GptqOptions o;
  o.percdamp = 0;
  for (int64_t bs : {1, 2, 128}) {
    o.block_size = bs;
    Tensor g = gptq_quantize_linear(Tensor::from_f32(W, {2, 4}), Tensor::from_f32(H, {4, 4}), spec_of(3, 0), o);
    EXPECT_TRUE(test::all_close(g.to_f32_vector(), expect, 1e-6f, 0.f)) << "block_size " << bs;
  }
  // The shift b/c moves w1 of row 0 across a grid point: GPTQ differs from RTN here (the test can fail).
  Tensor r = rtn(Tensor::from_f32(W, {2, 4}), spec_of(3, 0));
  EXPECT_GT(test::max_abs_diff(r.to_f32_vector(), expect), 0.05f);
}

// Lazy block updates are exact in exact arithmetic: any block size gives (almost) the same result.
// Per-channel only: with groups smaller than a block the group parameters come from the block-start
// weights (the reference's behaviour, quant/gptq.h), so there the block size does matter.
TEST(Gptq, BlockSizeDoesNotChangeTheResult) {
  Tensor w = Tensor::uniform({16, 96}, -1, 1, 21);
  Tensor X = Tensor::uniform({512, 96}, -1, 1, 22);
  Tensor H = hessian_of(X);
  GptqOptions o;
  o.block_size = 96;
  std::vector<float> ref = gptq_quantize_linear(w, H, spec_of(3, 0), o).to_f32_vector();
  for (int64_t bs : {1, 7, 32, 128}) {
    o.block_size = bs;
    std::vector<float> g = gptq_quantize_linear(w, H, spec_of(3, 0), o).to_f32_vector();
    int64_t same = 0;
    for (size_t i = 0; i < g.size(); ++i) same += std::fabs(g[i] - ref[i]) < 1e-5f;
    EXPECT_GE(same, static_cast<int64_t>(g.size()) * 98 / 100) << "block_size " << bs;
  }
}

TEST(Gptq, DeadColumnsAreZeroed) {
  Tensor w = Tensor::uniform({16, 32}, -1, 1, 31);
  std::vector<float> x = Tensor::uniform({256, 32}, -1, 1, 32).to_f32_vector();
  for (int64_t r = 0; r < 256; ++r) x[static_cast<size_t>(r * 32 + 3)] = x[static_cast<size_t>(r * 32 + 10)] = 0.f;
  Tensor X = Tensor::from_f32(x, {256, 32});
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    Tensor g = gptq_quantize_linear(w, hessian_of(X), spec_of(3, 0), o);
    std::vector<float> gv = g.to_f32_vector();
    for (int64_t r = 0; r < 16; ++r) {
      // Per-channel ranges contain 0 here, so quant(0) = (zp − zp)·scale = 0 exactly.
      EXPECT_EQ(gv[static_cast<size_t>(r * 32 + 3)], 0.f);
      EXPECT_EQ(gv[static_cast<size_t>(r * 32 + 10)], 0.f);
      for (int64_t i = 0; i < 32; ++i) EXPECT_TRUE(std::isfinite(gv[static_cast<size_t>(r * 32 + i)]));
    }
    EXPECT_LT(layer_error(X, w, g), layer_error(X, w, rtn_gptq(w, spec_of(3, 0), o)));
  }
}

TEST(Gptq, HessianAccumulationIsTheMeanOverTokens) {
  Tensor x = Tensor::uniform({2, 5, 8}, -1, 1, 41);
  Tensor H;
  int64_t n = 0;
  gptq_accumulate_hessian(H, n, x.view_rows(0, 1));
  gptq_accumulate_hessian(H, n, x.view_rows(1, 1));
  EXPECT_EQ(n, 10);
  std::vector<float> xv = x.to_f32_vector(), ref(64, 0.f);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = 0;
      for (int r = 0; r < 10; ++r) s += static_cast<double>(xv[r * 8 + i]) * xv[r * 8 + j];
      ref[static_cast<size_t>(i * 8 + j)] = static_cast<float>(2.0 * s / 10.0);
    }
  EXPECT_TRUE(test::all_close(H.to_f32_vector(), ref, 1e-6f, 1e-5f));
}

// ---------------------------------------------------------------------------------------------
// OmniQuant-then-GPTQ: LWC clip factors

// Clip factors per site of a block (every Linear), all `one` or random in [lo, 1].
std::map<std::string, GptqClip> block_clip(const ModelConfig& cfg, const BlockWeights& w, const WeightQuantSpec& spec,
                                           float lo, bool one) {
  std::map<std::string, GptqClip> m;
  uint64_t seed = 80;
  for (const std::string& s : block_linear_sites(cfg)) {
    const Tensor& W = w.get(s + ".weight");
    GptqClip c = random_clip(W, spec, lo, seed += 2);
    if (one) std::fill(c.hi.begin(), c.hi.end(), 1.f), std::fill(c.lo.begin(), c.lo.end(), 1.f);
    m[s] = c;
  }
  return m;
}

// With H = I and fake_quant's range rule, the clipped GPTQ quantizer is LWC's fake-quant bit for bit.
TEST(GptqClip, IdentityHessianEqualsLwcFakeQuant) {
  Tensor w = Tensor::uniform({16, 64}, -1, 1, 91);
  for (const WeightQuantSpec& spec : {spec_of(3, 0), spec_of(4, 16), spec_of(3, 32, true)}) {
    const int64_t n = spec.num_groups(16, 64);
    Tensor gamma = Tensor::uniform({n}, -1.f, 4.f, 92), beta = Tensor::uniform({n}, -1.f, 4.f, 93);
    GptqClip clip = gptq_clip_from_lwc(gamma, beta);
    GptqOptions o;
    o.range_contains_zero = false;
    Tensor lwc = fake_quant_weight_forward(w, spec, &gamma, &beta);
    EXPECT_TRUE(test::all_close(rtn_gptq(w, spec, o, &clip), lwc, 0.f, 0.f));
    EXPECT_GT(test::max_abs_diff(lwc.to_f32_vector(), rtn(w, spec).to_f32_vector()), 1e-3f);  // clipping acts
  }
}

TEST(GptqClip, FactorsOfOneAreBitwiseUnclipped) {
  for (const char* arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    Tensor inps = block_inputs(ck, 2, 128);
    for (const WeightQuantSpec& spec : {spec_of(3, 0), spec_of(4, 64)}) {
      BlockWeights a = ck.load_block(1, DType::f32, Device::cpu());
      BlockWeights b = ck.load_block(1, DType::f32, Device::cpu());
      GptqOptions o;
      gptq_quantize_block(cfg, a, inps, spec, o);
      o.clip = block_clip(cfg, b, spec, 1.f, true);
      gptq_quantize_block(cfg, b, inps, spec, o);
      for (const std::string& s : block_linear_sites(cfg))
        EXPECT_TRUE(test::all_close(a.get(s + ".weight"), b.get(s + ".weight"), 0.f, 0.f)) << arch << " " << s;
    }
  }
  // Linear level, both range rules, act_order with static groups.
  Tensor w = Tensor::uniform({16, 64}, -1, 1, 94);
  Tensor H = hessian_of(Tensor::uniform({256, 64}, -1, 1, 95));
  for (bool contain : {true, false}) {
    GptqOptions o;
    o.range_contains_zero = contain;
    o.act_order = o.static_groups = true;
    GptqClip one = random_clip(w, spec_of(3, 16), 1.f, 96);
    EXPECT_TRUE(test::all_close(gptq_quantize_linear(w, H, spec_of(3, 16), o, &one),
                                gptq_quantize_linear(w, H, spec_of(3, 16), o), 0.f, 0.f));
  }
}

// Sequential block with clip factors < 1 on every Linear: on the inputs each Linear sees in the
// quantized block, GPTQ beats RTN with the same clipping and quantizer.
TEST(GptqClip, ClippedBlockBeatsClippedRtn) {
  for (const char* arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    Tensor inps = block_inputs(ck, 4, 128);
    BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
    for (const WeightQuantSpec& spec : {spec_of(3, 0), spec_of(4, 128)}) {
      for (bool contain : {true, false}) {
        BlockWeights q = ck.load_block(1, DType::f32, Device::cpu());
        BlockWeights u = ck.load_block(1, DType::f32, Device::cpu());
        GptqOptions o;
        o.range_contains_zero = contain;
        gptq_quantize_block(cfg, u, inps, spec, o);
        o.clip = block_clip(cfg, w, spec, 0.8f, false);
        gptq_quantize_block(cfg, q, inps, spec, o);
        InputCapture cap = capture_inputs(cfg, q, inps);
        for (const std::string& s : block_linear_sites(cfg)) {
          Tensor X = cap.x(s);
          const Tensor& W = w.get(s + ".weight");
          double eg = layer_error(X, W, q.get(s + ".weight"));
          double er = layer_error(X, W, rtn_gptq(W, spec, o, &o.clip.at(s)));
          std::printf("%s clipped W%dg%d contain0=%d %-9s gptq/rtn = %.3f\n", arch, spec.bits, spec.group_size,
                      contain, s.c_str(), eg / er);
          EXPECT_LT(eg, er) << arch << " " << s;
          EXPECT_GT(test::max_abs_diff(q.get(s + ".weight").to_f32_vector(), u.get(s + ".weight").to_f32_vector()),
                    1e-4f);  // the clipping changed the result
        }
      }
    }
  }
}

TEST(GptqClip, BadFactorsAreErrors) {
  Tensor w = Tensor::uniform({8, 32}, -1, 1, 97);
  Tensor H = eye(32);
  GptqClip small = random_clip(w, spec_of(3, 16), 0.8f, 98);
  EXPECT_THROW(gptq_quantize_linear(w, H, spec_of(3, 8), GptqOptions{}, &small), omniq::Error);  // 16 groups, not 32
  GptqOptions dyn;
  dyn.act_order = true;  // dynamic groups of permuted columns have no LWC factors
  EXPECT_THROW(gptq_quantize_linear(w, H, spec_of(3, 16), dyn, &small), omniq::Error);
  GptqClip neg = small;
  neg.lo[3] = -0.5f;
  EXPECT_THROW(gptq_quantize_linear(w, H, spec_of(3, 16), GptqOptions{}, &neg), omniq::Error);
  ModelCheckpoint ck(nano("llama"));
  BlockWeights b = ck.load_block(1, DType::f32, Device::cpu());
  GptqOptions o;
  o.clip["qkv_proj"] = small;  // no such site
  EXPECT_THROW(gptq_quantize_block(ck.config(), b, block_inputs(ck, 1, 16), spec_of(3, 16), o), omniq::Error);
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

TEST(GptqCuda, HessianMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  Tensor x = Tensor::uniform({3, 40, 96}, -2, 2, 51);
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor xd = x.to(dt);  // the CPU sees the same (bf16-rounded) values
    Tensor Hc, Hg;
    int64_t nc = 0, ng = 0;
    Tensor xg = xd.to(Device::cuda(0));
    for (int64_t j = 0; j < 3; ++j) {
      gptq_accumulate_hessian(Hc, nc, xd.view_rows(j, 1));
      gptq_accumulate_hessian(Hg, ng, xg.view_rows(j, 1));
    }
    EXPECT_EQ(nc, ng);
    EXPECT_TRUE(Hg.device().is_cuda());
    // f32 accumulation on both sides, different summation order: atol 1e-4 rtol 1e-4.
    EXPECT_TRUE(test::all_close(Hg.to_f32_vector(), Hc.to_f32_vector(), 1e-4f, 1e-4f)) << dtype_name(dt);
  }
}

TEST(GptqCuda, LinearMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  ModelCheckpoint ck(nano("llama"));
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  InputCapture cap = capture_inputs(ck.config(), w, block_inputs(ck, 4, 128));
  struct Case {
    WeightQuantSpec spec;
    bool act, stat;
    bool clip = false, contain = true;  // LWC clip factors; the range rule
  };
  for (const char* site : {"q_proj", "down_proj"}) {  // 256 and 768 inputs (several blocks)
    Tensor X = cap.x(site);
    Tensor H = hessian_of(X);
    const Tensor& W = w.get(std::string(site) + ".weight");
    for (const Case& c : {Case{spec_of(3, 0), false, false}, Case{spec_of(4, 128), false, false},
                          Case{spec_of(4, 64), true, false}, Case{spec_of(3, 128), true, true},
                          Case{spec_of(4, 0, true), false, false}, Case{spec_of(3, 0), false, false, true, true},
                          Case{spec_of(4, 128), false, false, true, false}, Case{spec_of(3, 128), true, true, true, true},
                          Case{spec_of(4, 64), false, false, false, false}}) {
      GptqOptions o;
      o.act_order = c.act;
      o.static_groups = c.stat;
      o.range_contains_zero = c.contain;
      GptqClip clip = random_clip(W, c.spec, 0.7f, 71);
      const GptqClip* cp = c.clip ? &clip : nullptr;
      Tensor gc = gptq_quantize_linear(W, H, c.spec, o, cp);
      Tensor gg = gptq_quantize_linear(W.to(Device::cuda(0)), H.to(Device::cuda(0)), c.spec, o, cp);
      EXPECT_TRUE(gg.device().is_cuda());
      std::vector<float> a = gc.to_f32_vector(), b = gg.to_f32_vector();
      int64_t same = 0;
      for (size_t i = 0; i < a.size(); ++i) same += std::fabs(a[i] - b[i]) <= 1e-5f * (1 + std::fabs(a[i]));
      double ec = layer_error(X, W, gc), eg = layer_error(X, W, gg);
      std::printf("%s W%dg%d act=%d static=%d clip=%d contain0=%d: same %.4f, err cuda/cpu %.5f\n", site,
                  c.spec.bits, c.spec.group_size, c.act, c.stat, c.clip, c.contain, double(same) / a.size(), eg / ec);
      // Only the GEMM's summation order differs: most grid decisions agree, the objective within 1%.
      EXPECT_GE(same, static_cast<int64_t>(a.size()) * 9 / 10);
      EXPECT_NEAR(eg / ec, 1.0, 0.01);
    }
  }
  // Diagonal H: no GEMM contribution, so the CUDA result is RTN bit for bit (both range rules,
  // symmetric too, with and without clip factors); the weight gets an all-positive and an all-zero row.
  std::vector<float> wv = w.get("q_proj.weight").to_f32_vector();
  for (int64_t i = 0; i < 256; ++i) {
    wv[static_cast<size_t>(i)] = std::fabs(wv[static_cast<size_t>(i)]);
    wv[static_cast<size_t>(256 + i)] = 0.f;
  }
  const Tensor W = Tensor::from_f32(wv, {256, 256});
  std::vector<float> diag(256 * 256, 0.f);
  for (int i = 0; i < 256; ++i) diag[static_cast<size_t>(i * 257)] = 1.0f + 0.01f * i;
  Tensor Hd = Tensor::from_f32(diag, {256, 256}, DType::f32, Device::cuda(0));
  for (bool contain : {true, false})
    for (const WeightQuantSpec& spec : {spec_of(3, 64), spec_of(4, 0, true), spec_of(3, 0)}) {
      GptqOptions o;
      o.range_contains_zero = contain;
      GptqClip clip = random_clip(W, spec, 0.6f, 61);
      Tensor g = gptq_quantize_linear(W.to(Device::cuda(0)), Hd, spec, o);
      EXPECT_TRUE(test::all_close(g.to_f32_vector(), rtn_gptq(W, spec, o).to_f32_vector(), 0.f, 0.f));
      if (!contain) EXPECT_TRUE(test::all_close(g.to_f32_vector(), rtn(W, spec).to_f32_vector(), 0.f, 0.f));
      Tensor gc = gptq_quantize_linear(W.to(Device::cuda(0)), Hd, spec, o, &clip);
      EXPECT_TRUE(test::all_close(gc.to_f32_vector(), rtn_gptq(W, spec, o, &clip).to_f32_vector(), 0.f, 0.f));
    }
}

TEST(GptqCuda, BlockMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const char* arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    Tensor inps = block_inputs(ck, 4, 128);
    BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
    BlockWeights qc = ck.load_block(1, DType::f32, Device::cpu());
    BlockWeights qg = ck.load_block(1, DType::f32, Device::cuda(0));
    gptq_quantize_block(cfg, qc, inps, spec_of(4, 128), GptqOptions{});
    gptq_quantize_block(cfg, qg, inps.to(Device::cuda(0)), spec_of(4, 128), GptqOptions{});
    InputCapture cap = capture_inputs(cfg, qc, inps);
    for (const std::string& s : block_linear_sites(cfg)) {
      Tensor X = cap.x(s);
      const Tensor& W = w.get(s + ".weight");
      double ec = layer_error(X, W, qc.get(s + ".weight")), eg = layer_error(X, W, qg.get(s + ".weight").to(Device::cpu()));
      std::printf("%s %-9s block err cuda/cpu %.5f\n", arch, s.c_str(), eg / ec);
      // Within a block the groups are sequential: a later group's Hessian comes from inputs that went
      // through the earlier (CUDA vs CPU) quantized weights, whose rounding decisions differ on a few
      // elements, so the last group (fc2/down_proj) drifts most: measured up to 1.5% on the H100.
      EXPECT_NEAR(eg / ec, 1.0, 0.03) << arch << " " << s;
      EXPECT_LT(eg, layer_error(X, W, rtn_gptq(W, spec_of(4, 128), GptqOptions{})));
    }
    // bf16 inputs (the compute dtype of a real run): the driver casts the Linears for the forward.
    BlockWeights qb = ck.load_block(1, DType::f32, Device::cuda(0));
    gptq_quantize_block(cfg, qb, inps.to(Device::cuda(0)).to(DType::bf16), spec_of(4, 128), GptqOptions{});
    for (const std::string& s : block_linear_sites(cfg)) {
      const Tensor& W = w.get(s + ".weight");
      double eb = layer_error(cap.x(s), W, qb.get(s + ".weight").to(Device::cpu()));
      // bf16 inputs change H and the sequential inputs more than the backend does: measured on the
      // H100 eb = 4.797 vs 4.322 for the f32 CPU (+11%, llama down_proj, the last sequential group);
      // bound 15%. It must stay better than RTN.
      EXPECT_LT(eb, 1.15 * layer_error(cap.x(s), W, qc.get(s + ".weight"))) << arch << " " << s;
      EXPECT_LT(eb, layer_error(cap.x(s), W, rtn_gptq(W, spec_of(4, 128), GptqOptions{}))) << arch << " " << s;
    }
  }
}

// OmniQuant-then-GPTQ on the GPU: the clipped sequential block agrees with the CPU (f32).
TEST(GptqCuda, ClippedBlockMatchesCpu) {
  OMNIQ_REQUIRE_CUDA();
  for (const char* arch : {"llama", "opt"}) {
    ModelCheckpoint ck(nano(arch));
    const ModelConfig& cfg = ck.config();
    Tensor inps = block_inputs(ck, 4, 128);
    BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
    for (bool contain : {true, false}) {
      BlockWeights qc = ck.load_block(1, DType::f32, Device::cpu());
      BlockWeights qg = ck.load_block(1, DType::f32, Device::cuda(0));
      GptqOptions o;
      o.range_contains_zero = contain;
      o.clip = block_clip(cfg, w, spec_of(3, 0), 0.8f, false);
      gptq_quantize_block(cfg, qc, inps, spec_of(3, 0), o);
      gptq_quantize_block(cfg, qg, inps.to(Device::cuda(0)), spec_of(3, 0), o);
      InputCapture cap = capture_inputs(cfg, qc, inps);
      for (const std::string& s : block_linear_sites(cfg)) {
        Tensor X = cap.x(s);
        const Tensor& W = w.get(s + ".weight");
        double ec = layer_error(X, W, qc.get(s + ".weight"));
        double eg = layer_error(X, W, qg.get(s + ".weight").to(Device::cpu()));
        std::printf("%s clipped contain0=%d %-9s block err cuda/cpu %.5f\n", arch, contain, s.c_str(), eg / ec);
        EXPECT_NEAR(eg / ec, 1.0, 0.03) << arch << " " << s;  // as BlockMatchesCpu
        EXPECT_LT(eg, layer_error(X, W, rtn_gptq(W, spec_of(3, 0), o, &o.clip.at(s)))) << arch << " " << s;
      }
    }
  }
}
