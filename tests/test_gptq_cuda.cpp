// GPTQ on CUDA agrees with the CPU path (quant/gptq.h): Hessian accumulation, single Linears under
// every option, the sequential block driver in f32 and bf16, and LWC clip factors.

#include "tests/gptq_test_util.h"

using namespace omniq;
using namespace gptq_test;

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
