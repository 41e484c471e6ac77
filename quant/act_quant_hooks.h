// Block hooks that only quantize activations (per token, `abits`): the inputs of every Linear and
// the attention operands q, k, v. Used to run an already-fused weight-activation model.
#pragma once
#include "autograd/quant_functions.h"
#include "models/decoder_block.h"

namespace omniq {

class ActivationQuantHooks : public BlockHooks {
 public:
  explicit ActivationQuantHooks(int abits) : abits_(abits) {}
  ag::Var activation(ag::Tape& t, const std::string& site, const ag::Var& x) override {
    return ag::fake_quant_act(t, x, abits_);
  }

 private:
  int abits_;
};

}  // namespace omniq
