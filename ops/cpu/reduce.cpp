// CPU reference of the reductions: plain loops, fp32 values, double accumulation for sums.
// min/max use fmaxf/fminf (NaN ignored), matching the CUDA kernels.
#include <cmath>
#include <vector>

#include "ops/reduce.h"

namespace omniq::cpu {

namespace {

float init_value(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return 0.0f;
    case ReduceOp::min: return INFINITY;
    case ReduceOp::max: return -INFINITY;
    case ReduceOp::absmax: return 0.0f;
  }
  return 0.0f;
}

// One step of a min/max-type reduction.
float combine(ReduceOp op, float acc, float v) {
  switch (op) {
    case ReduceOp::min: return std::fmin(acc, v);
    case ReduceOp::max: return std::fmax(acc, v);
    case ReduceOp::absmax: return std::fmax(acc, std::fabs(v));
    case ReduceOp::sum: break;
  }
  return acc + v;
}

}  // namespace

Tensor row_reduce(ReduceOp op, const Tensor& x) {
  const int64_t R = x.rows(), C = x.cols();
  std::vector<float> v = x.to_f32_vector();
  std::vector<float> out(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    const float* row = v.data() + r * C;
    if (op == ReduceOp::sum) {
      double s = 0;
      for (int64_t c = 0; c < C; ++c) s += row[c];
      out[r] = static_cast<float>(s);
    } else {
      float acc = init_value(op);
      for (int64_t c = 0; c < C; ++c) acc = combine(op, acc, row[c]);
      out[r] = acc;
    }
  }
  return Tensor::from_f32(out, Shape{R});
}

Tensor col_reduce(ReduceOp op, const Tensor& x) {
  const int64_t R = x.rows(), C = x.cols();
  std::vector<float> v = x.to_f32_vector();
  std::vector<float> out(static_cast<size_t>(C), init_value(op));
  if (op == ReduceOp::sum) {
    std::vector<double> s(static_cast<size_t>(C), 0.0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) s[c] += v[r * C + c];
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(s[c]);
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) out[c] = combine(op, out[c], v[r * C + c]);
  }
  return Tensor::from_f32(out, Shape{C});
}

Tensor sum_all(const Tensor& x, bool mean) {
  std::vector<float> v = x.to_f32_vector();
  double s = 0;
  for (float f : v) s += f;
  if (mean) s /= static_cast<double>(v.size());
  return Tensor::from_f32({static_cast<float>(s)}, Shape{1});
}

}  // namespace omniq::cpu
