// GPTQ (quant/gptq.h): beats RTN on the layer-wise objective ‖WX − ŴX‖² for every Linear of real
// nano blocks (per layer on fp inputs, and through the sequential block driver), equals RTN exactly
// when H is diagonal, matches a hand derivation on a 2×4 case, handles dead inputs, and the CUDA
// path agrees with the CPU.
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
    double er = layer_error(X, W, rtn(W, spec));
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
    double er = layer_error(X, W, rtn(W, spec));
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
  Tensor r = rtn(w, spec_of(8, 0));
  // One 8-bit step is 2/255 ≈ 0.008; error feedback moves a value by at most a few steps.
  EXPECT_TRUE(test::all_close(g, w, 0.02f, 0.f));
  EXPECT_TRUE(test::all_close(g, r, 0.03f, 0.f));
  EXPECT_LT(layer_error(X, w, g), layer_error(X, w, r));
}

// With a diagonal H every off-diagonal of U is 0: no error feedback, so GPTQ is RTN bit for bit
// (also with act_order when the groups are static, and for any block size).
TEST(Gptq, DiagonalHessianEqualsRtnExactly) {
  Tensor w = Tensor::uniform({8, 32}, -2, 1, 11);
  std::vector<float> eye(32 * 32, 0.f), diag(32 * 32, 0.f);
  std::vector<float> d = Tensor::uniform({32}, 0.1f, 5.f, 12).to_f32_vector();
  for (int i = 0; i < 32; ++i) {
    eye[i * 33] = 1.f;
    diag[i * 33] = d[static_cast<size_t>(i)];
  }
  for (auto spec : {spec_of(4, 0), spec_of(3, 8), spec_of(4, 16, true), spec_of(2, 32)}) {
    for (const auto& H : {eye, diag}) {
      GptqOptions o;
      o.block_size = 5;
      Tensor Ht = Tensor::from_f32(H, {32, 32});
      EXPECT_TRUE(test::all_close(gptq_quantize_linear(w, Ht, spec, o), rtn(w, spec), 0.f, 0.f));
      o.act_order = true;
      o.static_groups = true;
      EXPECT_TRUE(test::all_close(gptq_quantize_linear(w, Ht, spec, o), rtn(w, spec), 0.f, 0.f));
    }
  }
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
    EXPECT_LT(layer_error(X, w, g), layer_error(X, w, rtn(w, spec_of(3, 0))));
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
  };
  for (const char* site : {"q_proj", "down_proj"}) {  // 256 and 768 inputs (several blocks)
    Tensor X = cap.x(site);
    Tensor H = hessian_of(X);
    const Tensor& W = w.get(std::string(site) + ".weight");
    for (const Case& c : {Case{spec_of(3, 0), false, false}, Case{spec_of(4, 128), false, false},
                          Case{spec_of(4, 64), true, false}, Case{spec_of(3, 128), true, true},
                          Case{spec_of(4, 0, true), false, false}}) {
      GptqOptions o;
      o.act_order = c.act;
      o.static_groups = c.stat;
      Tensor gc = gptq_quantize_linear(W, H, c.spec, o);
      Tensor gg = gptq_quantize_linear(W.to(Device::cuda(0)), H.to(Device::cuda(0)), c.spec, o);
      EXPECT_TRUE(gg.device().is_cuda());
      std::vector<float> a = gc.to_f32_vector(), b = gg.to_f32_vector();
      int64_t same = 0;
      for (size_t i = 0; i < a.size(); ++i) same += std::fabs(a[i] - b[i]) <= 1e-5f * (1 + std::fabs(a[i]));
      double ec = layer_error(X, W, gc), eg = layer_error(X, W, gg);
      std::printf("%s W%dg%d act=%d static=%d: same %.4f, err cuda/cpu %.5f\n", site, c.spec.bits,
                  c.spec.group_size, c.act, c.stat, double(same) / a.size(), eg / ec);
      // Only the GEMM's summation order differs: most grid decisions agree, the objective within 1%.
      EXPECT_GE(same, static_cast<int64_t>(a.size()) * 9 / 10);
      EXPECT_NEAR(eg / ec, 1.0, 0.01);
    }
  }
  // Diagonal H: no GEMM contribution, so the CUDA result is RTN bit for bit.
  const Tensor& W = w.get("q_proj.weight");
  std::vector<float> diag(256 * 256, 0.f);
  for (int i = 0; i < 256; ++i) diag[static_cast<size_t>(i * 257)] = 1.0f + 0.01f * i;
  Tensor Hd = Tensor::from_f32(diag, {256, 256}, DType::f32, Device::cuda(0));
  Tensor g = gptq_quantize_linear(W.to(Device::cuda(0)), Hd, spec_of(3, 64), GptqOptions{});
  EXPECT_TRUE(test::all_close(g.to_f32_vector(), rtn(W, spec_of(3, 64)).to_f32_vector(), 0.f, 0.f));
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
      EXPECT_LT(eg, layer_error(X, W, rtn(W, spec_of(4, 128))));
    }
    // bf16 inputs (the compute dtype of a real run): the driver casts the Linears for the forward.
    BlockWeights qb = ck.load_block(1, DType::f32, Device::cuda(0));
    gptq_quantize_block(cfg, qb, inps.to(Device::cuda(0)).to(DType::bf16), spec_of(4, 128), GptqOptions{});
    for (const std::string& s : block_linear_sites(cfg)) {
      const Tensor& W = w.get(s + ".weight");
      double eb = layer_error(cap.x(s), W, qb.get(s + ".weight").to(Device::cpu()));
      // bf16 inputs change H and the sequential inputs more than the backend does: measured up to
      // 5.7% above the f32 CPU error (down_proj); it must stay clearly better than RTN.
      EXPECT_LT(eb, 1.10 * layer_error(cap.x(s), W, qc.get(s + ".weight"))) << arch << " " << s;
      EXPECT_LT(eb, layer_error(cap.x(s), W, rtn(W, spec_of(4, 128)))) << arch << " " << s;
    }
  }
}
