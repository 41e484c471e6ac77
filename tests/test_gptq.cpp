// GPTQ (quant/gptq.h): beats RTN (same quantizer) on the layer-wise objective ‖WX − ŴX‖² for every
// Linear of real nano blocks (per layer on fp inputs, and through the sequential block driver),
// equals RTN exactly when H is diagonal (both range rules: the original GPTQ quantizer checked
// against an independent implementation, fake_quant's bit for bit), matches a hand derivation on a
// 2×4 case, handles dead inputs and supports LWC clip factors (OmniQuant-then-GPTQ). CUDA vs CPU:
// tests/test_gptq_cuda.cpp.

#include "tests/gptq_test_util.h"

using namespace omniq;
using namespace gptq_test;


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
