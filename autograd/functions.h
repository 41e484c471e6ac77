// Differentiable functions: each runs an op's forward and records its backward on the tape when
// an input requires a gradient. Shapes and dtypes follow the ops in ops/*.h.
#pragma once
#include "autograd/tape.h"
#include "ops/elementwise.h"

namespace omniq::ag {

// GEMM / epilogue fusions of the training step, each removing one elementwise pass per use and
// one bf16 rounding:
//   kFuseResidual  a residual add folded into the Linear GEMM's epilogue (linear_residual);
//   kFuseDx        a Linear's dX accumulated by its GEMM (β = 1) into a gradient buffer that exists;
//   kFuseNorm      a norm's dx added in place by the norm's dx kernel.
// The environment (read once, at the first call) switches them off for A/B comparisons:
// OMNIQ_NO_GEMM_FUSION=1 (or "all") all of them, or a comma list of parts, e.g. "dx,norm"
// ("residual", "dx", "norm"); unset, empty or "0": all on. Tests set them directly.
enum GemmFusion : unsigned { kFuseResidual = 1u, kFuseDx = 2u, kFuseNorm = 4u, kFuseAll = 7u };
unsigned gemm_fusion_parts();                        // the enabled parts
void set_gemm_fusion_parts(unsigned parts);
bool gemm_fusion_enabled(unsigned parts = kFuseAll);  // every part in `parts` enabled
void set_gemm_fusion_enabled(bool on);                // all parts on or off
unsigned gemm_fusion_parts_from_env(const char* value);  // parses an OMNIQ_NO_GEMM_FUSION value
bool gemm_fusion_env_default();  // the environment now (not cached): all parts on

// Y = X·Wᵀ (+ b). x [..., K], w [N, K], b [N] or null.
Var linear(Tape& t, const Var& x, const Var& w, const Var& b = nullptr);
// Y = residual + (X·Wᵀ (+ b)): the residual ([..., N], x's dtype) is added in the GEMM epilogue and
// its gradient is dY handed over without a copy. Without fusion: add(residual, linear(x, w, b)).
Var linear_residual(Tape& t, const Var& x, const Var& w, const Var& b, const Var& residual);
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
