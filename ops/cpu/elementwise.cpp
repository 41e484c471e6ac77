// CPU reference of the elementwise ops: fp32 values in plain loops; results converted back to a's
// dtype. Gradient reductions over the broadcast dimension accumulate in double.
#include <vector>

#include "ops/elementwise.h"

namespace omniq::cpu {

namespace {

float apply(BinaryOp op, float x, float y) {
  switch (op) {
    case BinaryOp::add: return x + y;
    case BinaryOp::sub: return x - y;
    case BinaryOp::mul: return x * y;
    case BinaryOp::div: return x / y;
  }
  return 0.0f;
}

// Index into b of element (r, c) of a.
int64_t b_index(Broadcast bc, int64_t r, int64_t c, int64_t C) {
  switch (bc) {
    case Broadcast::same: return r * C + c;
    case Broadcast::row: return c;
    case Broadcast::col: return r;
    case Broadcast::scalar: return 0;
  }
  return 0;
}

}  // namespace

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, Broadcast bc) {
  const int64_t R = a.rows(), C = a.cols();
  std::vector<float> va = a.to_f32_vector(), vb = b.to_f32_vector();
  std::vector<float> out(va.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = apply(op, va[r * C + c], vb[b_index(bc, r, c, C)]);
  return Tensor::from_f32(out, a.shape(), a.dtype());
}

Tensor scale(const Tensor& a, float s) {
  std::vector<float> v = a.to_f32_vector();
  for (float& x : v) x *= s;
  return Tensor::from_f32(v, a.shape(), a.dtype());
}

void add_inplace(Tensor& a, const Tensor& b, float alpha) {
  std::vector<float> va = a.to_f32_vector(), vb = b.to_f32_vector();
  for (size_t i = 0; i < va.size(); ++i) va[i] += alpha * vb[i];
  a.copy_from(Tensor::from_f32(va, a.shape(), DType::f32));
}

BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, Broadcast bc,
                            bool need_da, bool need_db) {
  const int64_t R = a.rows(), C = a.cols();
  std::vector<float> va = a.to_f32_vector(), vb = b.to_f32_vector(), g = dy.to_f32_vector();
  std::vector<float> da(need_da ? va.size() : 0);
  std::vector<double> db(need_db ? vb.size() : 0, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c, j = b_index(bc, r, c, C);
      const float gi = g[i], x = va[i], y = vb[j];
      // d(x op y)/dx and d(x op y)/dy, times the incoming gradient.
      float gx = 0, gy = 0;
      switch (op) {
        case BinaryOp::add: gx = gi; gy = gi; break;
        case BinaryOp::sub: gx = gi; gy = -gi; break;
        case BinaryOp::mul: gx = gi * y; gy = gi * x; break;
        case BinaryOp::div: gx = gi / y; gy = -gi * x / (y * y); break;
      }
      if (need_da) da[i] = gx;
      if (need_db) db[j] += gy;
    }
  }
  BinaryGrads grads;
  if (need_da) grads.da = Tensor::from_f32(da, a.shape(), a.dtype());
  if (need_db) {
    std::vector<float> dbf(db.begin(), db.end());
    // Same-shape add/sub: db = ±dy holds values of dy's dtype, so b's dtype (when it is dy's) is exact.
    const bool exact_in_b = (op == BinaryOp::add || op == BinaryOp::sub) && bc == Broadcast::same &&
                            b.dtype() == dy.dtype();
    grads.db = Tensor::from_f32(dbf, b.shape(), exact_in_b ? b.dtype() : DType::f32);
  }
  return grads;
}

}  // namespace omniq::cpu
