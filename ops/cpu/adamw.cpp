// CPU reference of AdamW: the shared element update (ops/adamw.h) over every element.
#include "ops/adamw.h"

namespace omniq::cpu {

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const detail::AdamWScalars& s) {
  float* p = param.data_as<float>();
  const float* g = grad.data_as<const float>();
  float* mp = m.data_as<float>();
  float* vp = v.data_as<float>();
  const int64_t n = param.numel();
  for (int64_t i = 0; i < n; ++i) detail::adamw_update(p[i], mp[i], vp[i], g[i], s);
}

}  // namespace omniq::cpu
