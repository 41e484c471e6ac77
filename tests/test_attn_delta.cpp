// δ = rowsum(dO ⊙ O) of the CUDA attention backward (ops/cuda/attention.cu): the vectorised kernel
// (16-byte loads, several rows per warp) must give δ's exact bits of the scalar one-row-per-warp
// kernel, which OMNIQ_ATTN_DELTA_SCALAR=1 forces. δ is internal to attention_backward, and every
// gradient depends on it (dS = P ⊙ (dP − δ)), so the whole backward is compared bitwise with and
// without the switch (deterministic attention, so reruns are bitwise comparable), on the flash path
// (bf16/f16, D 64/128) and the materialised one (f32, other D), with row counts that leave a warp's
// chunk partly empty. CUDA vs CPU of the backward (hence of δ) is covered by test_attention.cpp.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops/attention.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

::testing::AssertionResult same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    return ::testing::AssertionFailure() << a.str() << " vs " << b.str();
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  if (std::memcmp(ha.data(), hb.data(), ha.nbytes()) == 0) return ::testing::AssertionSuccess();
  const std::vector<float> fa = ha.to_f32_vector(), fb = hb.to_f32_vector();
  int64_t n = 0, first = -1;
  for (size_t i = 0; i < fa.size(); ++i)
    if (fa[i] != fb[i]) {
      ++n;
      if (first < 0) first = static_cast<int64_t>(i);
    }
  return ::testing::AssertionFailure() << n << " elements differ; first at " << first << ": "
                                       << (first >= 0 ? fa[first] : 0.f) << " vs " << (first >= 0 ? fb[first] : 0.f);
}

struct Case {
  int64_t B, T, Hq, Hkv, D;
  DType dt;
};

AttentionGrads backward(const Case& c, bool scalar_delta) {
  const Device gpu = Device::cuda();
  Tensor q = Tensor::uniform({c.B, c.T, c.Hq, c.D}, -1, 1, 1, c.dt, gpu);
  Tensor k = Tensor::uniform({c.B, c.T, c.Hkv, c.D}, -1, 1, 2, c.dt, gpu);
  Tensor v = Tensor::uniform({c.B, c.T, c.Hkv, c.D}, -1, 1, 3, c.dt, gpu);
  Tensor dout = Tensor::uniform({c.B, c.T, c.Hq, c.D}, -1, 1, 4, c.dt, gpu);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  Tensor lse;
  Tensor out = attention_forward(q, k, v, scale, true, &lse);
  if (scalar_delta) setenv("OMNIQ_ATTN_DELTA_SCALAR", "1", 1);
  else unsetenv("OMNIQ_ATTN_DELTA_SCALAR");
  AttentionGrads g = attention_backward(dout, q, k, v, out, lse, scale, true);
  unsetenv("OMNIQ_ATTN_DELTA_SCALAR");
  return g;
}

void expect_same_bits(const Case& c) {
  const std::string what = std::string(dtype_name(c.dt)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) +
                           " Hq" + std::to_string(c.Hq) + " Hkv" + std::to_string(c.Hkv) + " D" + std::to_string(c.D);
  AttentionGrads a = backward(c, true), b = backward(c, false);
  EXPECT_TRUE(same_bits(a.dq, b.dq)) << "dq " << what;
  EXPECT_TRUE(same_bits(a.dk, b.dk)) << "dk " << what;
  EXPECT_TRUE(same_bits(a.dv, b.dv)) << "dv " << what;
}

}  // namespace

TEST(AttnDeltaCuda, VectorisedDeltaGivesTheScalarKernelsBits) {
  OMNIQ_REQUIRE_CUDA();
  set_attention_deterministic(true);
  const Case cases[] = {
      {1, 256, 4, 4, 128, DType::bf16},  // flash path, 8 rows per warp
      {2, 37, 3, 1, 128, DType::bf16},   // 222 rows: the last warps' chunks partly empty
      {1, 100, 8, 2, 64, DType::bf16},   // D 64: 16 rows per warp, GQA
      {1, 64, 4, 2, 128, DType::f16},    // f16
      {1, 33, 5, 5, 128, DType::f32},    // materialised path, 4 rows per warp
      {1, 40, 2, 1, 80, DType::bf16},    // D 80: 160-byte rows, 8 rows per warp (1280-byte chunks)
      {1, 21, 3, 3, 96, DType::f32},     // 384-byte rows: 4 per warp
      {1, 9, 2, 2, 6, DType::f32},       // 24-byte rows: the scalar kernel either way
  };
  for (const Case& c : cases) expect_same_bits(c);
}

// The LLaMA-7B step's shape: 65536 rows of D = 128 bf16.
TEST(AttnDeltaCuda, VectorisedDeltaAtLlama7bShape) {
  OMNIQ_REQUIRE_CUDA();
  set_attention_deterministic(true);
  expect_same_bits({1, 2048, 32, 32, 128, DType::bf16});
}
