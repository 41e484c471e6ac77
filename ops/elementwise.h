// Binary elementwise ops with row/column broadcasting, scaling and in-place accumulation.
//
// a is seen as a matrix [R, C] (R = a.rows(), C = last dim). b may be
//   - the same shape as a                                   (Broadcast::same),
//   - a single element (any shape with numel 1)             (Broadcast::scalar),
//   - a row of C elements: [C] or [1, C] (or [1, 1, C]...)  (Broadcast::row, repeated over rows),
//   - a column of R elements: a's shape with the last dim 1, or [R, 1]
//                                                           (Broadcast::col, repeated over columns).
// These are the forms the pipeline needs (per-channel LET scales/shifts, per-token scales); anything
// else is an error naming both shapes. b may have another float dtype than a (an f32 scale vector
// with a bf16 activation); the result has a's dtype and shape. Math is fp32 on both backends.
#pragma once
#include "runtime/tensor.h"

namespace omniq {

enum class BinaryOp { add, sub, mul, div };
enum class Broadcast { same, scalar, row, col };

const char* binary_op_name(BinaryOp op);

// How b broadcasts against a; throws naming `op` and both shapes when it does not.
Broadcast binary_broadcast(const Tensor& a, const Tensor& b, const char* op);

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b);  // a (op) broadcast(b), a's dtype
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor scale(const Tensor& a, float s);  // a * s, a's dtype

// a += alpha * b in place (same shape; b may have another float dtype, e.g. f32 a and bf16 b).
// Used for residual adds and gradient accumulation.
void add_inplace(Tensor& a, const Tensor& b, float alpha = 1.0f);

// Gradients of y = a (op) broadcast(b) given dy (a's shape). da has a's dtype and shape; db has b's
// shape: the broadcast dimension is summed (fp32 accumulation on CUDA, double on the CPU,
// deterministic on both) and db is f32, except for a same-shape add/sub where b has dy's dtype:
// there db = ±dy exactly, in that dtype (a copy, no f32 round trip; f32 would add nothing, and
// b's dtype in general would round an f32 dy for a bf16 b). A gradient that is not needed is left
// undefined. If dy's dtype differs from a's, dy is converted to a's dtype first.
struct BinaryGrads {
  Tensor da, db;
};
BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, bool need_da,
                            bool need_db);

namespace cpu {
Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, Broadcast bc);
Tensor scale(const Tensor& a, float s);
void add_inplace(Tensor& a, const Tensor& b, float alpha);
BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, Broadcast bc,
                            bool need_da, bool need_db);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, Broadcast bc);
Tensor scale(const Tensor& a, float s);
void add_inplace(Tensor& a, const Tensor& b, float alpha);
BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, Broadcast bc,
                            bool need_da, bool need_db);
}  // namespace cuda
#endif

}  // namespace omniq
