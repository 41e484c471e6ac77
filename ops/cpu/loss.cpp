// CPU reference of the losses (the specification the CUDA kernels are tested against). Inputs are
// widened to fp32; sums run in double; stored results are fp32 or the input's dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/loss.h"
#include "runtime/error.h"

namespace omniq::cpu {

namespace {

// The max-subtracted log-sum-exp of one row: m + log Σ exp(v − m), exact for |v| up to FLT_MAX.
double row_logsumexp(const float* v, int64_t V) {
  const float m = *std::max_element(v, v + V);
  double s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<double>(v[j]) - m);
  return m + std::log(s);
}

void check_target(int32_t t, int64_t row, int64_t V, const char* op) {
  OMNIQ_CHECK(t < V, "%s: target %d of row %lld is outside the vocabulary of %lld entries", op, t,
              static_cast<long long>(row), static_cast<long long>(V));
}

}  // namespace

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& nll) {
  const int64_t N = logits.rows(), V = logits.cols();
  const std::vector<float> lv = logits.to_f32_vector();
  const int32_t* tp = targets.data_as<const int32_t>();
  float* out = nll.data_as<float>();
  for (int64_t r = 0; r < N; ++r) {
    const int32_t t = tp[r];
    if (t < 0) {  // ignored row
      out[r] = 0.0f;
      continue;
    }
    check_target(t, r, V, "cross_entropy_forward");
    const float* row = &lv[r * V];
    out[r] = static_cast<float>(row_logsumexp(row, V) - row[t]);
  }
}

void cross_entropy_backward(const Tensor& dnll, const Tensor& logits, const Tensor& targets, Tensor& dlogits) {
  const int64_t N = logits.rows(), V = logits.cols();
  const std::vector<float> lv = logits.to_f32_vector();
  const int32_t* tp = targets.data_as<const int32_t>();
  const float* gp = dnll.data_as<const float>();
  std::vector<float> out(lv.size(), 0.0f);
  for (int64_t r = 0; r < N; ++r) {
    const int32_t t = tp[r];
    if (t < 0) continue;  // ignored row: zero gradient
    check_target(t, r, V, "cross_entropy_backward");
    const float* row = &lv[r * V];
    const double lse = row_logsumexp(row, V);
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(row[j] - lse);  // softmax
      out[r * V + j] = static_cast<float>(gp[r] * (p - (j == t ? 1.0 : 0.0)));
    }
  }
  dlogits.copy_from(Tensor::from_f32(out, dlogits.shape()));
}

void mse_loss_forward(const Tensor& a, const Tensor& b, Tensor& loss) {
  const std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector();
  double s = 0;
  for (size_t i = 0; i < av.size(); ++i) {
    const float d = av[i] - bv[i];
    s += static_cast<double>(d) * d;
  }
  loss.data_as<float>()[0] = static_cast<float>(s / static_cast<double>(av.size()));
}

void mse_loss_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da) {
  const std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector();
  // Same fp32 operations as the CUDA kernel: scale = (2/n)·dloss, da = (a − b)·scale.
  const float scale = static_cast<float>(2.0 / static_cast<double>(av.size())) * dloss.data_as<const float>()[0];
  std::vector<float> out(av.size());
  for (size_t i = 0; i < av.size(); ++i) out[i] = (av[i] - bv[i]) * scale;
  da.copy_from(Tensor::from_f32(out, da.shape()));
}

// The specification of the fused op: the composition it replaces, term by term on the row views
// (mse_loss_forward / mse_loss_backward with d(loss) = 1), the losses added in fp32 and the
// gradients, each already in y's dtype, added in fp32 and rounded once more (as the tape's += does).
void mse_loss_rows_with_grad(const Tensor& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                             Tensor& loss, Tensor& dy) {
  const int32_t r = row.data_as<const int32_t>()[0];
  const Tensor one = Tensor::full(Shape{1}, 1.0f, DType::f32);
  float loss_sum = 0.0f;
  std::vector<float> grad_sum(static_cast<size_t>(y.numel()), 0.0f);
  for (size_t i = 0; i < tables.size(); ++i) {
    const Tensor& table = *tables[i];
    OMNIQ_CHECK(r >= 0 && r < table.size(0), "mse_loss_rows_with_grad: row %d is outside table %s", r,
                table.str().c_str());
    const Tensor target = table.view_rows(r, 1).reshape(y.shape());
    Tensor term = Tensor::empty(Shape{1}, DType::f32);
    mse_loss_forward(y, target, term);
    Tensor da = Tensor::empty(y.shape(), y.dtype());
    mse_loss_backward(one, y, target, da);
    loss_sum = i == 0 ? term.data_as<const float>()[0] : loss_sum + term.data_as<const float>()[0];
    const std::vector<float> g = da.to_f32_vector();
    for (size_t k = 0; k < g.size(); ++k) grad_sum[k] = i == 0 ? g[k] : grad_sum[k] + g[k];
  }
  loss.data_as<float>()[0] = loss_sum;
  dy.copy_from(Tensor::from_f32(grad_sum, y.shape(), y.dtype()));
}

}  // namespace omniq::cpu
