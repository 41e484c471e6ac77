// Weight fake-quant straight into the compute dtype, on CPU (and the same checks on the GPU):
//   * fake_quant_weight_forward(w, ..., out_dtype) is the fp32 x̂ rounded once: bitwise equal to
//     the f32 result cast to out_dtype, for w f32/bf16/f16 and out f32/bf16/f16;
//   * the backward takes dy in any float dtype (same values → bitwise the same gradients on CPU);
//   * ag::fake_quant_weight(..., bf16) gives the same ŵ and loss as fake-quant f32 + ag::cast, keeps
//     its gradient in f32 (no f32 → bf16 → f32 round trip of dW: dγ/dβ bitwise equal to the op on
//     the f32 gradient) and releases it after use; dγ agrees with the old cast path within the bf16
//     rounding that path applied to dW (rtol 2e-2);
//   * BlockQuantizer::param on a real (nano LLaMA) block with LET + LWC gives, for every parameter,
//     bitwise the values of the old path (param in f32, then cast to the compute dtype).
#include <map>
#include <string>
#include <vector>

#include "autograd/functions.h"
#include "autograd/quant_functions.h"
#include "models/causal_lm.h"
#include "models/checkpoint.h"
#include "models/datasets.h"
#include "models/tokenizer.h"
#include "ops/fake_quant.h"
#include "quant/block_quantizer.h"
#include "runtime/error.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

const DType kFloats[] = {DType::f32, DType::bf16, DType::f16};

std::vector<float> host(const Tensor& t) { return t.to(Device::cpu()).to_f32_vector(); }

// ---- autograd: one Linear whose weight is fake-quantized, loss = mse(x·ŵᵀ, target) -------------

struct StepResult {
  Tensor what, loss, dgamma, dbeta;  // ŵ as the Linear saw it, and the results of one backward
  bool what_grad_released = false;
  DType dgamma_dtype = DType::u8;
};

StepResult linear_step(Device dev, bool one_op, const WeightQuantSpec& spec) {
  const int64_t R = 16, C = 128, T = 8;
  const int64_t groups = spec.num_groups(R, C);
  ag::Var w = ag::constant(Tensor::from_f32(make_groups(groups, spec.group_len(C), 41), {R, C}, DType::f32, dev));
  ag::Var g = ag::parameter(Tensor::uniform({groups}, -1.0f, 5.0f, 42, DType::f32, dev), "gamma");
  ag::Var b = ag::parameter(Tensor::uniform({groups}, -1.0f, 5.0f, 43, DType::f32, dev), "beta");
  ag::Var x = ag::constant(Tensor::uniform({T, C}, -1.0f, 1.0f, 44, DType::bf16, dev));
  ag::Var target = ag::constant(Tensor::uniform({T, R}, -1.0f, 1.0f, 45, DType::bf16, dev));
  ag::Tape t;
  ag::Var wq = one_op ? ag::fake_quant_weight(t, w, spec, g, b, DType::bf16)
                      : ag::cast(t, ag::fake_quant_weight(t, w, spec, g, b), DType::bf16);
  ag::Var loss = ag::mse_loss(t, ag::linear(t, x, wq), target);
  t.backward(loss);
  StepResult r;
  r.what = wq->value.to(Device::cpu());
  r.loss = loss->value.to(Device::cpu());
  r.dgamma = g->grad.to(Device::cpu());
  r.dbeta = b->grad.to(Device::cpu());
  r.dgamma_dtype = g->grad.dtype();
  r.what_grad_released = !wq->grad.defined();
  return r;
}

void check_linear_step(Device dev) {
  for (const WeightQuantSpec& spec : {WeightQuantSpec{4, 32}, WeightQuantSpec{3, 0, true}}) {
    SCOPED_TRACE("W" + std::to_string(spec.bits) + " g" + std::to_string(spec.group_size));
    StepResult a = linear_step(dev, true, spec), ref = linear_step(dev, false, spec);
    ASSERT_EQ(a.what.dtype(), DType::bf16);
    EXPECT_TRUE(bit_equal(a.what.to_f32_vector(), ref.what.to_f32_vector())) << "ŵ";
    EXPECT_TRUE(bit_equal(a.loss.to_f32_vector(), ref.loss.to_f32_vector())) << "loss";
    EXPECT_TRUE(a.what_grad_released) << "ŵ's gradient must not outlive the backward";
    EXPECT_EQ(a.dgamma_dtype, DType::f32);
    // The old path rounded dW to bf16 before the quantizer's backward; the new one does not.
    const std::vector<float> rg = ref.dgamma.to_f32_vector(), rb = ref.dbeta.to_f32_vector();
    EXPECT_TRUE(all_close(a.dgamma.to_f32_vector(), rg, 2e-2f * max_abs(rg), 2e-2f)) << "dgamma";
    EXPECT_TRUE(all_close(a.dbeta.to_f32_vector(), rb, 2e-2f * max_abs(rb), 2e-2f)) << "dbeta";
    EXPECT_GT(max_abs(rg), 0.0f);
  }
}

// A consumer that hands ŵ (bf16) an f32 gradient with values bf16 cannot hold: the quantizer's
// backward must see exactly those values (dγ, dβ bitwise equal to the op called on the f32 dW).
// A bf16 ŵ's gradient reaches the quantizer's backward in bf16 (as the dW GEMM writes it, and as
// under PyTorch autocast), rounded exactly once: an f32 dW handed to it is rounded to bf16 and the
// LWC gradients are those of that bf16 dW, bit for bit, and differ from the f32 dW's.
void check_gradient_reaches_quantizer_in_weight_dtype(Device dev) {
  const WeightQuantSpec spec{4, 64};
  const int64_t R = 8, C = 256, groups = spec.num_groups(R, C);
  ag::Var w = ag::constant(Tensor::from_f32(make_groups(groups, 64, 51), {R, C}, DType::f32, dev));
  ag::Var g = ag::parameter(Tensor::uniform({groups}, -1.0f, 5.0f, 52, DType::f32, dev), "gamma");
  ag::Var b = ag::parameter(Tensor::uniform({groups}, -1.0f, 5.0f, 53, DType::f32, dev), "beta");
  Tensor dw = Tensor::uniform({R, C}, -1.0f, 1.0f, 54, DType::f32, dev);
  ag::Tape t;
  ag::Var wq = ag::fake_quant_weight(t, w, spec, g, b, DType::bf16);
  ag::Var loss = ag::constant(Tensor::full({1}, 0.0f, DType::f32, dev));
  t.record({wq}, loss, [&](const Tensor&) { ag::accumulate_grad(*wq, dw.clone()); });  // like linear's dW
  t.backward(loss);
  FakeQuantWeightGrads ref =
      fake_quant_weight_backward(dw.to(DType::bf16), w->value, spec, &g->value, &b->value, false);
  EXPECT_TRUE(bit_equal(host(g->grad), host(ref.dgamma))) << "dgamma from the bf16 gradient";
  EXPECT_TRUE(bit_equal(host(b->grad), host(ref.dbeta))) << "dbeta from the bf16 gradient";
  FakeQuantWeightGrads full = fake_quant_weight_backward(dw, w->value, spec, &g->value, &b->value, false);
  EXPECT_FALSE(bit_equal(host(full.dgamma), host(ref.dgamma))) << "the test must see the dtype of the gradient";
  EXPECT_FALSE(wq->grad.defined()) << "ŵ's gradient must not outlive the backward";
}

// ---- BlockQuantizer::param on a nano LLaMA block ----------------------------------------------

std::string nano(const char* arch) { return source_path(std::string("data/models/") + arch + "-nano"); }

Tensor block_input(const ModelCheckpoint& ck, int64_t T) {
  Tokenizer tok = Tokenizer::from_model_dir(ck.dir());
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  ids.resize(static_cast<size_t>(T));
  NamedWeights emb = ck.load_embeddings(DType::f32, Device::cpu());
  return embed_tokens(ck.config(), emb, Tensor::from_i32(ids, {1, T}), Device::cpu());
}

// Every parameter through param() with compute bf16 equals param() with compute f32, then cast.
void check_block_param(Device dev, int group_size, bool symmetric) {
  SCOPED_TRACE("g" + std::to_string(group_size) + (symmetric ? " sym" : " asym"));
  ModelCheckpoint ck(nano("llama"));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, dev);
  ActivationStatsRecorder stats;
  {
    ag::Tape t;
    decoder_block_forward(t, cfg, block_params(w), ag::constant(block_input(ck, 32).to(dev)), &stats);
  }
  QuantConfig qc;
  qc.method = "omniquant";
  qc.wbits = 4;
  qc.group_size = group_size;
  qc.symmetric = symmetric;
  qc.lwc = true;
  qc.let = true;
  BlockQuantizer bf(cfg, qc, w, &stats.stats(), DType::bf16);
  BlockQuantizer f32(cfg, qc, w, &stats.stats(), DType::f32);
  // The same random LET / LWC values in both (far from their inits, so clipping matters).
  uint64_t seed = 11;
  for (auto& [key, v] : bf.learned()) {
    bool lwc = key.find(".lwc_") != std::string::npos;
    Tensor r = Tensor::uniform(v->value.shape(), lwc ? -1.0f : 0.5f, lwc ? 5.0f : 2.0f, seed++, DType::f32, dev);
    v->value.copy_from(r);
    f32.learned().at(key)->value.copy_from(r);
  }
  int linear_weights = 0;
  for (const auto& [key, p] : block_params(w)) {
    SCOPED_TRACE(key);
    ag::Tape t1, t2;
    ag::Var got = bf.param(t1, key, p);
    ag::Var ref = f32.param(t2, key, p);
    bool linear_weight = key.find("_proj.weight") != std::string::npos;
    linear_weights += linear_weight;
    EXPECT_EQ(got->value.dtype(), linear_weight ? DType::bf16 : ref->value.dtype());
    EXPECT_TRUE(bit_equal(host(got->value), host(ref->value.to(got->value.dtype()))));
  }
  EXPECT_EQ(linear_weights, 7);
  // The fused (exported) block: fake-quant straight to bf16 == fake-quant in f32, then cast.
  BlockWeights fb = bf.fused(w, DType::bf16), ff = f32.fused(w, DType::f32);
  for (const auto& [key, tns] : ff.tensors) {
    SCOPED_TRACE("fused " + key);
    const Tensor& got = fb.get(key);
    EXPECT_TRUE(bit_equal(host(got), host(tns.to(got.dtype()))));
  }
}

}  // namespace

TEST(FakeQuantDtypesCpu, OutDtypeIsTheF32ResultRoundedOnce) {
  for (DType wdt : kFloats) {
    for (int group : {0, 32, 64, 128}) {
      for (bool sym : {false, true}) {
        for (bool lwc : {false, true}) {
          SCOPED_TRACE(std::string(dtype_name(wdt)) + " g" + std::to_string(group) + (sym ? " sym" : "") +
                       (lwc ? " lwc" : ""));
          const WeightQuantSpec spec{4, group, sym};
          const int64_t R = 12, C = 256, groups = spec.num_groups(R, C);
          Tensor w = Tensor::from_f32(make_groups(groups, spec.group_len(C), 7 + group), {R, C}, wdt);
          Tensor g = Tensor::uniform({groups}, -1.0f, 5.0f, 8), b = Tensor::uniform({groups}, -1.0f, 5.0f, 9);
          const Tensor* gp = lwc ? &g : nullptr;
          const Tensor* bp = lwc ? &b : nullptr;
          Tensor y32 = fake_quant_weight_forward(w, spec, gp, bp, DType::f32);
          for (DType odt : kFloats) {
            Tensor y = fake_quant_weight_forward(w, spec, gp, bp, odt);
            ASSERT_EQ(y.dtype(), odt);
            EXPECT_TRUE(bit_equal(y.to_f32_vector(), y32.to(odt).to_f32_vector())) << dtype_name(odt);
          }
          EXPECT_TRUE(bit_equal(fake_quant_weight_forward(w, spec, gp, bp).to_f32_vector(),
                                fake_quant_weight_forward(w, spec, gp, bp, wdt).to_f32_vector()))
              << "default out dtype = w's";
        }
      }
    }
  }
}

TEST(FakeQuantDtypesCpu, BackwardTakesAnyDyDtype) {
  const WeightQuantSpec spec{4, 64};
  const int64_t R = 8, C = 256, groups = spec.num_groups(R, C);
  for (DType wdt : kFloats) {
    Tensor w = Tensor::from_f32(make_groups(groups, 64, 3), {R, C}, wdt);
    Tensor g = Tensor::uniform({groups}, -1.0f, 5.0f, 4), b = Tensor::uniform({groups}, -1.0f, 5.0f, 5);
    // bf16-representable values, so every dy dtype holds exactly the same numbers.
    Tensor dy_bf = Tensor::uniform({R, C}, -1.0f, 1.0f, 6, DType::bf16);
    FakeQuantWeightGrads ref = fake_quant_weight_backward(dy_bf.to(wdt), w, spec, &g, &b, true);
    for (DType gdt : kFloats) {
      SCOPED_TRACE(std::string("w ") + dtype_name(wdt) + " dy " + dtype_name(gdt));
      FakeQuantWeightGrads got = fake_quant_weight_backward(dy_bf.to(gdt), w, spec, &g, &b, true);
      ASSERT_EQ(got.dw.dtype(), wdt);
      EXPECT_TRUE(bit_equal(got.dw.to_f32_vector(), ref.dw.to_f32_vector()));
      EXPECT_TRUE(bit_equal(got.dgamma.to_f32_vector(), ref.dgamma.to_f32_vector()));
      EXPECT_TRUE(bit_equal(got.dbeta.to_f32_vector(), ref.dbeta.to_f32_vector()));
    }
  }
  Tensor w = Tensor::uniform({R, C}, -1.0f, 1.0f, 1);
  EXPECT_THROW(fake_quant_weight_backward(Tensor::zeros({R, C}, DType::i32), w, spec, nullptr, nullptr, true), Error);
  EXPECT_THROW(fake_quant_weight_backward(Tensor::zeros({R, C + 1}, DType::f32), w, spec, nullptr, nullptr, true), Error);
  EXPECT_THROW(fake_quant_weight_forward(w, spec, nullptr, nullptr, DType::i8), Error);
}

TEST(FakeQuantDtypesCpu, AutogradBf16OutputMatchesCastPath) { check_linear_step(Device::cpu()); }

TEST(FakeQuantDtypesCpu, GradientReachesTheQuantizerInWeightDtype) {
  check_gradient_reaches_quantizer_in_weight_dtype(Device::cpu());
}

TEST(FakeQuantDtypesBlockCuda, GradientReachesTheQuantizerInWeightDtype) {
  OMNIQ_REQUIRE_CUDA();
  check_gradient_reaches_quantizer_in_weight_dtype(Device::cuda(0));
}

TEST(FakeQuantDtypesCpu, BlockParamEqualsQuantizeThenCast) {
  check_block_param(Device::cpu(), 64, false);
  check_block_param(Device::cpu(), 0, true);
}

TEST(FakeQuantDtypesBlockCuda, AutogradBf16OutputMatchesCastPath) {
  OMNIQ_REQUIRE_CUDA();
  check_linear_step(Device::cuda(0));
}

TEST(FakeQuantDtypesBlockCuda, BlockParamEqualsQuantizeThenCast) {
  OMNIQ_REQUIRE_CUDA();
  check_block_param(Device::cuda(0), 64, false);
  check_block_param(Device::cuda(0), 128, false);
  check_block_param(Device::cuda(0), 0, true);
}
