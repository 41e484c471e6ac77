// CPU reference of the LET-fused weight fake-quant (ops/fake_quant_let.h): the transformed weight u
// is materialised in f32 with the same single IEEE operations as the op chain (w·c, then ÷ or · r),
// and the plain quantizer (ops/cpu/fake_quant.cpp) runs on it; the scales' gradients are reduced
// in double (this side is the more accurate one).
#include <vector>

#include "ops/fake_quant_let.h"

namespace omniq::cpu {

namespace {

// u = (w · c_j) ∘ r_i in f32, and v = w · c_j (what the row gradient of a multiplying r needs).
void transform(const std::vector<float>& w, int64_t rows, int64_t cols, const LetScales& let, std::vector<float>& v,
               std::vector<float>& u) {
  const std::vector<float> c = let.col ? let.col->to_f32_vector() : std::vector<float>();
  const std::vector<float> r = let.row ? let.row->to_f32_vector() : std::vector<float>();
  v.resize(w.size());
  u.resize(w.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const size_t k = static_cast<size_t>(i * cols + j);
      const float vv = let.col ? w[k] * c[static_cast<size_t>(j)] : w[k];
      v[k] = vv;
      if (!let.row) u[k] = vv;
      else u[k] = let.row_divide ? vv / r[static_cast<size_t>(i)] : vv * r[static_cast<size_t>(i)];
    }
  }
}

}  // namespace

void fake_quant_let_forward(const Tensor& w, const GroupQuantParams& p, const Tensor* gamma, const Tensor* beta,
                            const LetScales& let, Tensor& y) {
  std::vector<float> v, u;
  transform(w.to_f32_vector(), w.size(0), w.size(1), let, v, u);
  fake_quant_groups_forward(Tensor::from_f32(u, w.shape()), p, gamma, beta, y);
}

void fake_quant_let_backward(const Tensor& dy, const Tensor& w, const GroupQuantParams& p, const Tensor* gamma,
                             const Tensor* beta, const LetScales& let, FakeQuantLetGrads& g) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const std::vector<float> wv = w.to_f32_vector();
  std::vector<float> v, u;
  transform(wv, rows, cols, let, v, u);
  Tensor ut = Tensor::from_f32(u, w.shape());
  Tensor du = Tensor::empty(w.shape(), DType::f32);
  fake_quant_groups_backward(dy, ut, p, gamma, beta, &du, gamma ? &g.dgamma : nullptr, beta ? &g.dbeta : nullptr);
  const std::vector<float> d = du.to_f32_vector();
  const std::vector<float> r = let.row ? let.row->to_f32_vector() : std::vector<float>();
  std::vector<double> dc(static_cast<size_t>(cols), 0.0);
  std::vector<float> drow(static_cast<size_t>(rows), 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    double dr = 0.0;
    const float ri = let.row ? r[static_cast<size_t>(i)] : 1.0f;
    for (int64_t j = 0; j < cols; ++j) {
      const size_t k = static_cast<size_t>(i * cols + j);
      float dv = d[k];
      if (let.row) {
        dr += let.row_divide ? -static_cast<double>(d[k]) * u[k] / ri : static_cast<double>(d[k]) * v[k];
        dv = let.row_divide ? d[k] / ri : d[k] * ri;
      }
      dc[static_cast<size_t>(j)] += static_cast<double>(dv) * wv[k];
    }
    drow[static_cast<size_t>(i)] = static_cast<float>(dr);
  }
  if (let.row) g.drow.copy_from(Tensor::from_f32(drow, {rows}));
  if (let.col) {
    std::vector<float> dcf(dc.begin(), dc.end());
    g.dcol.copy_from(Tensor::from_f32(dcf, {cols}));
  }
}

}  // namespace omniq::cpu
