// Differentiable wrappers of the quantization ops (ops/fake_quant.h) and the small helpers the
// quantization methods need (dtype casts, gathers of per-channel vectors).
#pragma once
#include <cstdint>
#include <memory>

#include "autograd/tape.h"
#include "ops/fake_quant.h"
#include "ops/fake_quant_let.h"

namespace omniq::ag {

// Weight fake-quant with optional LWC: gamma/beta may be null (plain min-max RTN). The result is
// in out_dtype (default: w's): quantizing an f32 weight straight to the bf16 compute dtype is one
// op, bit-identical to fake-quant in f32 followed by cast(). With a bf16/f16 result, the result's
// gradient comes from the dW GEMM in that dtype (as under PyTorch autocast; OMNIQ_F32_WEIGHT_GRADS=1
// keeps it f32) and is handed to the op's backward as it is: no conversion kernel either way.
Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta,
                      DType out_dtype);
Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta);
// Weight fake-quant of the LET-transformed weight u = (w·col_j) ÷ row_i (row_divide) or · row_i, in
// one op (ops/fake_quant_let.h): w is a constant (the original weight), gradients flow to γ, β and
// the scale vectors col [in] / row [out] (either may be null). Check fake_quant_let_supported()
// first. The result's gradient dtype follows fake_quant_weight's.
Var fake_quant_weight_let(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta,
                          const Var& col, const Var& row, bool row_divide, DType out_dtype);
// The state of one weight trained with the fused LWC step (ops/fake_quant_lwc_update.h): a persistent
// ŵ that always holds fake_quant(w; γ, β) for the CURRENT γ, β, and aliases of the optimizer's AdamW
// moments of γ and β and of its per-step scalars buffer (rows slot_gamma, slot_beta).
struct FusedLwcWeight {
  WeightQuantSpec spec;
  Tensor w_hat;
  Tensor m_gamma, v_gamma, m_beta, v_beta;
  Tensor scalars;
  int64_t slot_gamma = 0, slot_beta = 0;
};
// ŵ of a frozen weight w from the fused LWC step's cache: the forward launches nothing and returns an
// alias of state->w_hat; the backward runs fake_quant_lwc_update with the incoming dŴ, which updates
// γ, β and their moments IN PLACE (the optimizer step of these two parameters) and rewrites w_hat for
// the next step. γ and β get NO gradient (the trainer's adamw_step_many_indirect skips parameters
// without one), w none either (it must not require one).
// Overwriting w_hat in the backward is safe: Tape::backward runs nodes in reverse order of recording,
// and every reader of ŵ (the Linear's matmul node: dX = dY·ŵ) took ŵ as an input, so it was recorded
// after this node and its backward has already been queued on the stream when this node runs (which
// is also why dŴ is complete by then: all of ŵ's consumers have added into it).
Var fake_quant_weight_cached(Tape& t, const Var& w, const Var& gamma, const Var& beta,
                             const std::shared_ptr<FusedLwcWeight>& state);
// Per-token (per row of the last dim) dynamic activation fake-quant; bits >= 16 is the identity.
Var fake_quant_act(Tape& t, const Var& x, int bits);
// sign(s)·max(|s|, floor), gradient passed straight through.
Var abs_floor_ste(Tape& t, const Var& s, float floor);
// Value converted to another dtype; the gradient is converted back.
Var cast(Tape& t, const Var& x, DType dtype);
// out[i] = v[idx[i]] for a vector v [N] and host/device i32 indices [M]; the gradient scatter-adds.
// Device indices are not range-checked (that would need a host sync per call, which CUDA-graph
// capture forbids): pass only indices built in range, as BlockQuantizer does; host ones are checked.
Var gather(Tape& t, const Var& v, const Tensor& idx);

}  // namespace omniq::ag
