// Differentiable functions: each runs an op's forward and records its backward on the tape when
// an input requires a gradient. Shapes and dtypes follow the ops in ops/*.h.
#pragma once
#include <utility>

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
// RoPE of an attention's q and k together: {rope(q), rope(k)} with the same bits, one CUDA launch
// forward and one backward (ops/rope.h rope_forward_qk). Two nodes are recorded, q's then k's; k's
// runs first in the backward and also takes q's rotated gradient if it has arrived (every consumer
// of q' was recorded after this call, so by then it has), rotating both in one launch; q's node then
// finds no gradient left and is skipped. If only q' reaches the loss, q's node rotates it alone.
std::pair<Var, Var> rope_qk(Tape& t, const Var& q, const Var& k, float theta, int64_t pos_offset = 0);
Var swiglu(Tape& t, const Var& gate, const Var& up);
Var relu(Tape& t, const Var& x);
// q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,D]
Var attention(Tape& t, const Var& q, const Var& k, const Var& v, float scale, bool causal = true);

// Scalar losses (f32 [1]).
Var mse_loss(Tape& t, const Var& a, const Var& b);
Var cross_entropy_mean(Tape& t, const Var& logits, const Tensor& targets);
// The block trainer's loss  Σ_i mse(y, tables[i][r])  for 1 or 2 target tables [N, ...] and the row
// r = row[0] read on the device (ops/loss.h mse_loss_rows_with_grad): one pass computes the loss and
// y's gradient for d(loss) = 1, bitwise what mse_loss(y, t_0) (+ add(·, mse_loss(y, t_1))) and
// Tape::backward from a seed of 1 give. The backward only hands that gradient to y, which is right
// only when the returned Var is the loss Tape::backward starts from and nothing on the tape is
// computed from it: the backward checks that no node was recorded after this one (and that it
// runs once). The tape must stay where it is (not moved) between recording and backward().
// `loss_into`: see mse_loss_rows_with_grad (the loss Var's value is then a view of it).
Var mse_loss_rows(Tape& t, const Var& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                  const Tensor* loss_into = nullptr);

}  // namespace omniq::ag
