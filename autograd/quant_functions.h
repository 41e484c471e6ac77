// Differentiable wrappers of the quantization ops (ops/fake_quant.h) and the small helpers the
// quantization methods need (dtype casts, gathers of per-channel vectors).
#pragma once
#include "autograd/tape.h"
#include "ops/fake_quant.h"

namespace omniq::ag {

// Weight fake-quant with optional LWC: gamma/beta may be null (plain min-max RTN). The result is
// in out_dtype (default: w's): quantizing an f32 weight straight to the bf16 compute dtype is one
// op, bit-identical to fake-quant in f32 followed by cast(). With a lower-precision result, the
// result's gradient is still kept in f32 (the dW GEMM writes f32) and handed to the op's backward
// as it is, so no conversion kernel runs in either direction.
Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta,
                      DType out_dtype);
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
