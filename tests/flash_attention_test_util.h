// Shared helpers of the flash attention tests (tests/test_flash_attention.cpp,
// tests/test_flash_attention_variants.cpp): the scaled 16-bit comparison, bitwise equality, and the
// delta = Σ_d dout ⊙ out input of cuda::flash_attention_backward.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/tensor.h"
#include "tests/support/test_support.h"

namespace omniq::fa_test {

// 16-bit comparisons: |got − ref| ≤ rel·max|ref| + rel·|ref|. atol is relative to the largest
// reference value (gradients cancel, so small entries carry the rounding of large ones), floored at
// rel·1e-3: where a gradient is zero in exact arithmetic (dq, dk at T = 1: a softmax over one key
// has no score gradient) both sides hold only ~1e-8 of rounding noise, which must not count as a
// mismatch.
inline ::testing::AssertionResult close_scaled(const Tensor& got, const Tensor& ref, float rel) {
  const auto r = ref.to(Device::cpu()).to_f32_vector();
  float m = 0;
  for (float x : r) m = std::max(m, std::fabs(x));
  return test::all_close(got.to(Device::cpu()).to_f32_vector(), r, rel * std::max(m, 1e-3f), rel);
}

// Byte-for-byte equality of two tensors of one shape and dtype (after copying to the CPU).
inline bool same_bits(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  return ha.shape() == hb.shape() && ha.dtype() == hb.dtype() && std::memcmp(ha.data(), hb.data(), ha.nbytes()) == 0;
}

// delta[b, h, t] = Σ_d dout ⊙ out, [B, Hq, T] f32 from the 16-bit CPU values `out_h`, `dout_h`
// ([B, T, Hq, D]; what attn_delta_kernel computes), on the GPU: the input of
// cuda::flash_attention_backward. `c` is any test case with fields B, T, Hq, D.
template <class CaseT>
Tensor delta_of(const Tensor& out_h, const Tensor& dout_h, const CaseT& c) {
  const auto o = out_h.to_f32_vector(), g = dout_h.to_f32_vector();
  std::vector<float> delta(static_cast<size_t>(c.B * c.Hq * c.T));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.Hq; ++h) {
        double acc = 0;
        for (int64_t d = 0; d < c.D; ++d) {
          const size_t i = static_cast<size_t>(((b * c.T + t) * c.Hq + h) * c.D + d);
          acc += static_cast<double>(o[i]) * g[i];
        }
        delta[static_cast<size_t>((b * c.Hq + h) * c.T + t)] = static_cast<float>(acc);
      }
  return Tensor::from_f32(delta, Shape{c.B, c.Hq, c.T}, DType::f32).to(Device::cuda());
}

}  // namespace omniq::fa_test
