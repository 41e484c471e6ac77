// CPU reference of the activations: fp32 math in plain loops, results in the input's dtype.
#include <cmath>
#include <vector>

#include "ops/activation.h"

namespace omniq::cpu {

namespace {
// 1 / (1 + e^-g): for g -> -inf, e^-g overflows to inf and the result is 0 (not NaN).
float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }
}  // namespace

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  std::vector<float> g = gate.to_f32_vector(), u = up.to_f32_vector();
  std::vector<float> y(g.size());
  for (size_t i = 0; i < g.size(); ++i) y[i] = g[i] * sigmoid(g[i]) * u[i];
  return Tensor::from_f32(y, gate.shape(), gate.dtype());
}

SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  std::vector<float> d = dy.to_f32_vector(), g = gate.to_f32_vector(), u = up.to_f32_vector();
  std::vector<float> dg(g.size()), du(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    const float s = sigmoid(g[i]);
    // d/dg [g s(g)] = s + g s (1 - s) = s (1 + g (1 - s))
    dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = d[i] * g[i] * s;
  }
  return {Tensor::from_f32(dg, gate.shape(), gate.dtype()), Tensor::from_f32(du, up.shape(), up.dtype())};
}

Tensor relu_forward(const Tensor& x) {
  std::vector<float> v = x.to_f32_vector();
  for (float& f : v) f = (f > 0.0f || std::isnan(f)) ? f : 0.0f;
  return Tensor::from_f32(v, x.shape(), x.dtype());
}

Tensor relu_backward(const Tensor& dy, const Tensor& x) {
  std::vector<float> d = dy.to_f32_vector(), v = x.to_f32_vector();
  for (size_t i = 0; i < v.size(); ++i) d[i] = v[i] <= 0.0f ? 0.0f : d[i];
  return Tensor::from_f32(d, x.shape(), x.dtype());
}

}  // namespace omniq::cpu
