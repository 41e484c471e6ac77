// Reductions used by the quantizers (per-row / per-channel ranges), LET initialisation (per-channel
// activation ranges), losses (sum/mean) and gradient reduction of broadcast operands.
//
// A tensor x is seen as a matrix [R, C] (R = x.rows(), C = last dim). All outputs are f32:
//   row_*(x) -> [R]  reduces over the last dim;   col_*(x) -> [C]  reduces over all rows;
//   sum_all / mean_all -> [1].
// Accumulation: row/col sums in fp32 on CUDA (fixed order, so deterministic), double on the CPU;
// sum_all/mean_all in double on both. Nothing uses float atomics: every CUDA result is bitwise
// reproducible on the same GPU.
//
// NaN: min/max/absmax use fmaxf/fminf semantics on both backends, i.e. NaN elements are ignored;
// a row made only of NaNs gives absmax 0, max -inf, min +inf. Sums propagate NaN.
// Empty reductions: sums give 0; min/max/absmax of an empty row/column are an error.
#pragma once
#include "runtime/tensor.h"

namespace omniq {

Tensor row_absmax(const Tensor& x);  // max_c |x[r, c]|   -> f32 [R]
Tensor row_min(const Tensor& x);     // min_c x[r, c]     -> f32 [R]
Tensor row_max(const Tensor& x);     // max_c x[r, c]     -> f32 [R]
Tensor row_sum(const Tensor& x);     // sum_c x[r, c]     -> f32 [R]
Tensor col_absmax(const Tensor& x);  // max_r |x[r, c]|   -> f32 [C]
Tensor col_min(const Tensor& x);     // min_r x[r, c]     -> f32 [C]
Tensor col_max(const Tensor& x);     // max_r x[r, c]     -> f32 [C]
Tensor col_sum(const Tensor& x);     // sum_r x[r, c]     -> f32 [C]
Tensor sum_all(const Tensor& x);     // sum of all elements (double accumulation) -> f32 [1]
Tensor mean_all(const Tensor& x);    // sum_all / numel -> f32 [1]

// Which statistic a row/col reduction computes (shared by the backends).
enum class ReduceOp { sum, min, max, absmax };

namespace cpu {
Tensor row_reduce(ReduceOp op, const Tensor& x);
Tensor col_reduce(ReduceOp op, const Tensor& x);
Tensor sum_all(const Tensor& x, bool mean);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor row_reduce(ReduceOp op, const Tensor& x);
Tensor col_reduce(ReduceOp op, const Tensor& x);
Tensor sum_all(const Tensor& x, bool mean);
}  // namespace cuda
#endif

}  // namespace omniq
