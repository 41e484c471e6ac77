// Shared checks of the persistent-NaN-loss tests (tests/test_quant.cpp,
// tests/test_block_trainer_graph.cpp, tests/test_block_trainer_fused_lwc.cpp): train_block on
// inputs whose sample 2 holds a NaN must report the sample, and leave every LWC parameter finite.
#pragma once
#include <cmath>
#include <string>

#include "models/decoder_block.h"
#include "quant/block_quantizer.h"
#include "quant/block_trainer.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq::bt_test {

// A small OmniQuant config of the trainer's bit-equality tests: LWC (+ LET and the aug loss with
// `let`), 3 epochs of 8 samples × 96 tokens.
inline QuantConfig omniquant(int wbits, int abits, int group, bool let) {
  QuantConfig qc;
  qc.method = "omniquant";
  qc.wbits = wbits;
  qc.abits = abits;
  qc.group_size = group;
  qc.lwc = true;
  qc.let = let;
  qc.aug_loss = let;
  qc.epochs = 3;
  qc.nsamples = 8;
  qc.seqlen = 96;
  return qc;
}

// train_block (block 0) must throw an Error naming "block 0 epoch 0 sample 2" and, with
// `expect_retries`, saying the retries ran out. FAIL()s when nothing is thrown: call it through
// ASSERT_NO_FATAL_FAILURE so the test stops there, as it would with the check inline.
inline void expect_nan_loss_reported(const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w,
                                     BlockQuantizer& bq, const Tensor& q_inps, const Tensor& fp_outs,
                                     bool expect_retries) {
  try {
    train_block(cfg, qc, block_params(w), bq, BlockTrainingData{&q_inps, &fp_outs, nullptr}, 0);
    FAIL() << "a NaN loss was not reported";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("block 0 epoch 0 sample 2"), std::string::npos) << m;
    if (expect_retries) EXPECT_NE(m.find("retries"), std::string::npos) << m;
  }
}

// Every LWC parameter of `bq` is finite (stops at the first one that is not).
inline void assert_lwc_params_finite(const BlockQuantizer& bq) {
  for (ag::Var& p : bq.lwc_params())
    for (float v : p->value.to_f32_vector()) ASSERT_TRUE(std::isfinite(v)) << p->name;
}

}  // namespace omniq::bt_test
