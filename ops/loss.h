// Losses: token cross entropy (perplexity evaluation) and mean squared error (block-output matching
// during calibration), with their backward passes. All math is fp32 (the CPU reference accumulates
// in double); logits / a / b may be f32 or bf16 (the CPU reference also takes f16).
#pragma once
#include <vector>

#include "runtime/tensor.h"

namespace omniq {

// ---- cross entropy -----------------------------------------------------------------------------
// Per-row negative log-likelihood, f32 [N] (logits may also be [..., V]: rows are flattened):
//   nll[r] = logsumexp(logits[r, :]) − logits[r, targets[r]]
// computed in fp32 with the row maximum subtracted before exp (no overflow for large logits).
// targets is i32 [N] on the logits' device. A negative target (e.g. -100, padding, or the last token
// of a window that has no successor) marks a row as ignored: its nll is 0 and its gradient is 0.
// Callers count the non-ignored rows themselves and sum nll in double on the host for perplexity.
// A target >= V is a caller bug: the CPU reference throws; the CUDA kernel cannot report it without
// a host sync, so it writes NaN for that row (and NaN gradients) instead.
Tensor cross_entropy_forward(const Tensor& logits /*[N, V] f32|bf16*/, const Tensor& targets /*i32 [N]*/);

// dlogits[r, j] = dnll[r] · (softmax(logits[r])_j − [j == targets[r]]), in logits' dtype; rows with a
// negative target get 0. dnll is f32 [N] on the logits' device.
Tensor cross_entropy_backward(const Tensor& dnll /*f32 [N]*/, const Tensor& logits, const Tensor& targets);

// ---- mean squared error --------------------------------------------------------------------------
// loss = mean((a − b)²) over all elements, returned as f32 [1] ON a's DEVICE: no host sync, the
// caller reads it (item()) when it needs the number, e.g. once per epoch. a and b have the same shape
// and dtype. The CUDA version reduces in two passes with a shape-determined grid (per-block partial
// sums in double, then one block sums them in order): bitwise reproducible, no float atomics.
Tensor mse_loss_forward(const Tensor& a, const Tensor& b);

// da = 2·(a − b)/n · dloss[0], in a's dtype, where dloss is f32 [1] on a's device (read there, no
// host sync). The gradient with respect to b is −da; it is not computed (in calibration b is the
// full-precision target, a constant).
Tensor mse_loss_backward(const Tensor& dloss /*f32 [1]*/, const Tensor& a, const Tensor& b);

// ---- the block trainer's loss: MSE against rows of target tables, value and gradient in one pass ----
// y is the block output (m elements, e.g. [1, T, C]); `tables` holds 1 or 2 target tables, each
// [N, ...] with rows of m elements (y's dtype, on y's device); `row` is i32 [1] on y's device and is
// read THERE (a CUDA graph can replay the call while the host changes the row with a device copy).
// With r = row[0] and t_i = tables[i] row r:
//   loss = Σ_i mse_loss_forward(y, t_i)                          (f32 [1]; the terms added in fp32)
//   dy   = Σ_i mse_loss_backward(1, y, t_i)   (each term in y's dtype, then added as the tape adds)
// i.e. the value and y's gradient of  mse_loss(y, t_0) (+ mse_loss(y, t_1))  backpropagated from a
// seed of 1 — bitwise (the CUDA kernel sums in the same order as mse_loss_forward, and rounds as
// mse_loss_backward + add_inplace do) whenever y and the table rows are all 16-byte aligned or all
// not (true for any row length m that is a multiple of 16 bytes), and without copying the rows out.
// The CPU reference composes the ops above. A row outside [0, N): the CPU throws; CUDA cannot report
// it without a host sync and returns a NaN loss and a NaN dy instead (the trainer's non-finite-loss
// check then stops it). `loss_into` (optional, f32 [1] on y's device): the loss is written there and
// the returned loss is a view of it (the trainer's fixed loss buffer: no copy per step).
struct MseLossGrad {
  Tensor loss;  // f32 [1], on y's device
  Tensor dy;    // y's shape and dtype
};
MseLossGrad mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables,
                                    const Tensor& row /*i32 [1]*/, const Tensor* loss_into = nullptr);

// ---- backends (arguments already validated by the functions above; call those instead) ----
namespace cpu {
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& nll);
void cross_entropy_backward(const Tensor& dnll, const Tensor& logits, const Tensor& targets, Tensor& dlogits);
void mse_loss_forward(const Tensor& a, const Tensor& b, Tensor& loss);
void mse_loss_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da);
void mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                             Tensor& loss, Tensor& dy);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& nll);
void cross_entropy_backward(const Tensor& dnll, const Tensor& logits, const Tensor& targets, Tensor& dlogits);
void mse_loss_forward(const Tensor& a, const Tensor& b, Tensor& loss);
void mse_loss_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da);
void mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                             Tensor& loss, Tensor& dy);
}  // namespace cuda
#endif

}  // namespace omniq
