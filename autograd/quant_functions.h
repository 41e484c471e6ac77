// Differentiable wrappers of the quantization ops (ops/fake_quant.h) and the small helpers the
// quantization methods need (dtype casts, gathers of per-channel vectors).
#pragma once
#include "autograd/tape.h"
#include "ops/fake_quant.h"

namespace omniq::ag {

// Weight fake-quant with optional LWC: gamma/beta may be null (plain min-max RTN).
Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta);
// Per-token (per row of the last dim) dynamic activation fake-quant; bits >= 16 is the identity.
Var fake_quant_act(Tape& t, const Var& x, int bits);
// sign(s)·max(|s|, floor), gradient passed straight through.
Var abs_floor_ste(Tape& t, const Var& s, float floor);
// Value converted to another dtype; the gradient is converted back.
Var cast(Tape& t, const Var& x, DType dtype);
// out[i] = v[idx[i]] for a vector v [N] and host/device i32 indices [M]; the gradient scatter-adds.
Var gather(Tape& t, const Var& v, const Tensor& idx);

}  // namespace omniq::ag
