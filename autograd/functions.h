// Differentiable functions: each runs an op's forward and records its backward on the tape when
// an input requires a gradient. Shapes and dtypes follow the ops in ops/*.h.
#pragma once
#include "autograd/tape.h"
#include "ops/elementwise.h"

namespace omniq::ag {

// Y = X·Wᵀ (+ b). x [..., K], w [N, K], b [N] or null.
Var linear(Tape& t, const Var& x, const Var& w, const Var& b = nullptr);
Var binary(Tape& t, BinaryOp op, const Var& a, const Var& b);
inline Var add(Tape& t, const Var& a, const Var& b) { return binary(t, BinaryOp::add, a, b); }
inline Var sub(Tape& t, const Var& a, const Var& b) { return binary(t, BinaryOp::sub, a, b); }
inline Var mul(Tape& t, const Var& a, const Var& b) { return binary(t, BinaryOp::mul, a, b); }
inline Var div(Tape& t, const Var& a, const Var& b) { return binary(t, BinaryOp::div, a, b); }
Var scale(Tape& t, const Var& x, float s);
Var reshape(Tape& t, const Var& x, const Shape& shape);

Var rmsnorm(Tape& t, const Var& x, const Var& w, float eps);
Var layernorm(Tape& t, const Var& x, const Var& w, const Var& b, float eps);
Var rope(Tape& t, const Var& x, float theta, int64_t pos_offset = 0);
Var swiglu(Tape& t, const Var& gate, const Var& up);
Var relu(Tape& t, const Var& x);
// q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,D]
Var attention(Tape& t, const Var& q, const Var& k, const Var& v, float scale, bool causal = true);

// Scalar losses (f32 [1]).
Var mse_loss(Tape& t, const Var& a, const Var& b);
Var cross_entropy_mean(Tape& t, const Var& logits, const Tensor& targets);

}  // namespace omniq::ag
