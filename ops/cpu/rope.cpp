// CPU reference of RoPE (see rope.h for the exact convention and rounding).
#include <cmath>
#include <vector>

#include "ops/rope.h"

namespace omniq::cpu {

namespace {
// cos/sin are cast to the activation dtype before use, as HF does (cos.to(x.dtype)).
float round_to(DType dt, float v) {
  if (dt == DType::bf16) return round_bf16(v);
  if (dt == DType::f16) return f16_to_f32(f32_to_f16(v));
  return v;
}
}  // namespace

Tensor rope(const Tensor& x, float theta, int64_t pos_offset, bool inverse) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const std::vector<float> inv = rope_inv_freq(D, theta);
  std::vector<float> v = x.to_f32_vector();
  std::vector<float> out(v.size());
  // Rotation by +angle (forward) or -angle (backward = transpose of the forward rotation).
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float p = static_cast<float>(pos_offset + t);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * inv[i];
      const float c = round_to(x.dtype(), static_cast<float>(std::cos(static_cast<double>(angle))));
      const float s = sign * round_to(x.dtype(), static_cast<float>(std::sin(static_cast<double>(angle))));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t base = ((b * T + t) * H + h) * D;
          const float x1 = v[base + i], x2 = v[base + i + half];
          out[base + i] = x1 * c - x2 * s;
          out[base + i + half] = x2 * c + x1 * s;
        }
      }
    }
  }
  return Tensor::from_f32(out, x.shape(), x.dtype());
}

}  // namespace omniq::cpu
