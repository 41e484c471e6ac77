// Device dispatch and argument checks of RoPE (see rope.h).
#include "ops/rope.h"

#include <cmath>

#include "runtime/error.h"

namespace omniq {

std::vector<float> rope_inv_freq(int64_t D, float theta) {
  std::vector<float> inv(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i) {
    // fp32 at every step, like torch: (2i).float() / D, theta ** e, 1.0 / that.
    const float e = static_cast<float>(2 * i) / static_cast<float>(D);
    const float p = std::pow(theta, e);  // powf
    inv[i] = 1.0f / p;
  }
  return inv;
}

namespace {

void check_rope_input(const Tensor& x, float theta, int64_t pos_offset, bool inverse, const char* op) {
  OMNIQ_CHECK(x.defined(), "%s: input is undefined", op);
  check_float(x, op, inverse ? "dy" : "x");
  OMNIQ_CHECK(x.ndim() == 4, "%s: expected (B, T, H, D), got %s", op, x.str().c_str());
  const int64_t D = x.size(3);
  OMNIQ_CHECK(D % 2 == 0 && D > 0 && D <= kRopeMaxHeadDim, "%s: head dim D=%lld must be even and at most %lld (%s)",
              op, static_cast<long long>(D), static_cast<long long>(kRopeMaxHeadDim), x.str().c_str());
  OMNIQ_CHECK(theta > 0.0f, "%s: theta must be positive, got %g", op, theta);
  // Positions are converted to fp32 (as HF does); beyond 2^24 they would no longer be exact.
  OMNIQ_CHECK(pos_offset >= 0 && pos_offset + x.size(1) <= (int64_t{1} << 24),
              "%s: positions [%lld, %lld) must lie in [0, 2^24)", op, static_cast<long long>(pos_offset),
              static_cast<long long>(pos_offset + x.size(1)));
}

Tensor rope_dispatch(const Tensor& x, float theta, int64_t pos_offset, bool inverse) {
  const char* op = inverse ? "rope_backward" : "rope_forward";
  check_rope_input(x, theta, pos_offset, inverse, op);
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::rope(x, theta, pos_offset, inverse);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, x.str().c_str());
#endif
  }
  return cpu::rope(x, theta, pos_offset, inverse);
}

RopeQk rope_qk_dispatch(const Tensor& q, const Tensor& k, float theta, int64_t pos_offset, bool inverse) {
  const char* op = inverse ? "rope_backward_qk" : "rope_forward_qk";
  check_rope_input(q, theta, pos_offset, inverse, op);
  check_rope_input(k, theta, pos_offset, inverse, op);
  OMNIQ_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && q.dtype() == k.dtype(),
              "%s: q %s and k %s must agree in B, T, D and dtype (only the head counts may differ)", op,
              q.str().c_str(), k.str().c_str());
  check_same_device(q, k, op);
  if (q.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::rope_qk(q, k, theta, pos_offset, inverse);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, q.str().c_str());
#endif
  }
  return {cpu::rope(q, theta, pos_offset, inverse), cpu::rope(k, theta, pos_offset, inverse)};
}

}  // namespace

RopeQk rope_forward_qk(const Tensor& q, const Tensor& k, float theta, int64_t pos_offset) {
  return rope_qk_dispatch(q, k, theta, pos_offset, false);
}
RopeQk rope_backward_qk(const Tensor& dq, const Tensor& dk, float theta, int64_t pos_offset) {
  return rope_qk_dispatch(dq, dk, theta, pos_offset, true);
}

Tensor rope_forward(const Tensor& x, float theta, int64_t pos_offset) { return rope_dispatch(x, theta, pos_offset, false); }
Tensor rope_backward(const Tensor& dy, float theta, int64_t pos_offset) {
  return rope_dispatch(dy, theta, pos_offset, true);
}

}  // namespace omniq
