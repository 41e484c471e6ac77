// GEMM autotuning (ops/cuda/gemm_autotune.h) must never change a bit: every op result with
// autotuning on equals the result with the heuristic's first algorithm, for the step's kinds of
// GEMM (plain, residual epilogue, bias, in-place dX accumulation, f32 and bf16 weight gradients,
// strided batch), at shapes where cuBLASLt offers several candidates.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "ops/matmul.h"
#include "runtime/tensor.h"
#include "tests/support/test_support.h"

#ifdef OMNIQ_HAS_CUDA
#include "ops/cuda/gemm_autotune.h"
#endif

using namespace omniq;

namespace {

#ifdef OMNIQ_HAS_CUDA
std::vector<uint8_t> bytes_of(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  const auto* p = static_cast<const uint8_t*>(h.data());
  return std::vector<uint8_t>(p, p + h.nbytes());
}

// Runs f with autotuning off, then on, and expects bit-identical outputs.
void expect_same_bits(const char* what, const std::function<Tensor()>& f) {
  cuda::set_gemm_autotune(false);
  const std::vector<uint8_t> ref = bytes_of(f());
  cuda::set_gemm_autotune(true);
  const std::vector<uint8_t> got = bytes_of(f());
  cuda::set_gemm_autotune(true);
  ASSERT_EQ(ref.size(), got.size()) << what;
  size_t diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) diff += ref[i] != got[i];
  EXPECT_EQ(diff, 0u) << what << ": " << diff << " of " << ref.size() << " bytes differ";
}
#endif

}  // namespace

TEST(GemmAutotuneCuda, OpsGiveTheHeuristicsBits) {
  OMNIQ_REQUIRE_CUDA();
#ifdef OMNIQ_HAS_CUDA
  const Device dev = Device::cuda(0);
  const DType bf = DType::bf16;
  // Shapes of a small LLaMA block at 512 tokens (big enough for several candidates, quick to tune).
  const int64_t T = 512, C = 1024, F = 2816;
  Tensor x = Tensor::uniform({T, C}, -1, 1, 11, bf, dev), h = Tensor::uniform({T, F}, -1, 1, 12, bf, dev);
  Tensor wc = Tensor::uniform({C, C}, -0.1f, 0.1f, 13, bf, dev), wf = Tensor::uniform({F, C}, -0.1f, 0.1f, 14, bf, dev);
  Tensor wd = Tensor::uniform({C, F}, -0.1f, 0.1f, 15, bf, dev), r = Tensor::uniform({T, C}, -1, 1, 16, bf, dev);
  Tensor dyc = Tensor::uniform({T, C}, -1, 1, 17, bf, dev), dyf = Tensor::uniform({T, F}, -1, 1, 18, bf, dev);
  Tensor bias = Tensor::uniform({F}, -1, 1, 19, bf, dev);
  expect_same_bits("forward", [&] { return linear_forward(x, wf); });
  expect_same_bits("forward + residual", [&] { return linear_forward(h, wd, nullptr, &r); });
  expect_same_bits("forward + bias", [&] { return linear_forward(x, wf, &bias); });
  expect_same_bits("dX", [&] { return linear_backward(dyc, h, wd, true, false, false).dx; });
  expect_same_bits("dX accumulate", [&] {
    Tensor acc = r.to(dev);
    linear_backward_dx_accumulate(dyf, wf, acc);
    return acc;
  });
  expect_same_bits("dW f32", [&] { return linear_backward(dyf, x, wf, false, true, false).dw; });
  expect_same_bits("dW bf16", [&] { return linear_backward(dyc, x, wc, false, true, false, bf).dw; });
  Tensor a3 = Tensor::uniform({4, 256, 128}, -1, 1, 20, bf, dev), b3 = Tensor::uniform({4, 256, 128}, -1, 1, 21, bf, dev);
  expect_same_bits("bmm", [&] { return bmm(a3, b3, false, true, 0.5f); });
#endif
}

// Autotuning must not touch the real output while it times candidates (it writes scratch buffers):
// an in-place accumulation tuned on first use adds exactly once.
TEST(GemmAutotuneCuda, TuningCallAccumulatesOnce) {
  OMNIQ_REQUIRE_CUDA();
#ifdef OMNIQ_HAS_CUDA
  const Device dev = Device::cuda(0);
  const int64_t T = 384, N = 768, K = 640;  // a shape no other test uses: the plan is new here
  Tensor dy = Tensor::uniform({T, N}, -1, 1, 31, DType::f32, dev), w = Tensor::uniform({N, K}, -1, 1, 32, DType::f32, dev);
  Tensor x0 = Tensor::uniform({T, K}, -1, 1, 33, DType::f32, dev);
  cuda::set_gemm_autotune(true);
  Tensor acc = x0.to(dev);
  linear_backward_dx_accumulate(dy, w, acc);
  Tensor ref = cpu::linear_backward(dy.to(Device::cpu()), x0.to(Device::cpu()), w.to(Device::cpu()), true, false,
                                    false)
                   .dx;
  std::vector<float> want = ref.to_f32_vector(), base = x0.to(Device::cpu()).to_f32_vector();
  for (size_t i = 0; i < want.size(); ++i) want[i] += base[i];
  EXPECT_TRUE(test::all_close(acc.to(Device::cpu()).to_f32_vector(), want, 1e-3f, 1e-4f));  // f32 GEMM, K = 768 terms
#endif
}
