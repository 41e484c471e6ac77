// CUDA RoPE fast path (ops/cuda/rope.cu): the vectorised apply kernel is bitwise the per-pair
// kernel (unaligned views still take that one), and the cached (cos, sin) table:
//   * a call whose key (device, D, theta, dtype) and positions are cached allocates only its output
//     (no table, no scratch), forward and backward alike;
//   * growing the table for later positions, or a range too long to cache, gives the same bits;
//   * a call captured into a CUDA graph is correct whether the table was cached or not, and a
//     capture never leaves graph-owned memory in the cache.
// Every test uses its own theta so that the process-wide cache starts cold for it.
#include <string>
#include <vector>

#include "ops/rope.h"
#include "runtime/allocator.h"
#include "tests/support/test_support.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_context.h"
#endif

using namespace omniq;
using omniq::test::all_close;

namespace {

// A copy of x whose data starts one element into its storage: not 16-byte aligned, so the launcher
// must take the per-pair kernel.
Tensor unaligned_copy(const Tensor& x) {
  Tensor base = Tensor::zeros({x.numel() + 1}, x.dtype(), x.device());
  Tensor v = base.view_rows(1, x.numel()).reshape(x.shape());
  v.copy_from(x);
  return v;
}

// Peak bytes allocated on the GPU by f() above what was live before it.
template <typename F>
int64_t peak_extra(F&& f) {
  const Device gpu = Device::cuda();
  reset_peak_memory(gpu);
  const int64_t base = memory_stats(gpu).live_bytes;
  f();
  return memory_stats(gpu).peak_bytes - base;
}

// Same tolerance as test_rope.cpp's CUDA vs CPU (room for a 1-ulp device sincos difference).
float atol_of(DType dt) { return dt == DType::bf16 ? 4e-3f : 1e-6f; }
float rtol_of(DType dt) { return dt == DType::bf16 ? 8e-3f : 1e-6f; }

}  // namespace

TEST(RopeCacheCuda, VectorPathIsBitwiseThePerPairPath) {
  OMNIQ_REQUIRE_CUDA();
  const Shape shapes[] = {
      {1, 64, 32, 128},  // LLaMA heads: 4 heads per thread, 8 (bf16) / 4 (f32) pairs per access
      {2, 37, 5, 64},    // H not a multiple of 4: the last head group is partial
      {1, 9, 3, 8},      // half = 4: vector path for f32 only (bf16 packs 8)
      {1, 5, 2, 6},      // half = 3: per-pair path for both
      {1, 2048, 32, 128},
  };
  for (const Shape& s : shapes) {
    for (DType dt : {DType::f32, DType::bf16}) {
      for (int64_t off : {int64_t{0}, int64_t{1000}}) {
        const std::string what = s.str() + " " + dtype_name(dt) + " offset " + std::to_string(off);
        Tensor x = Tensor::uniform(s, -1, 1, 31, dt, Device::cuda());
        Tensor xu = unaligned_copy(x);
        EXPECT_TRUE(all_close(rope_forward(x, 10000.0f, off), rope_forward(xu, 10000.0f, off), 0, 0)) << what;
        EXPECT_TRUE(all_close(rope_backward(x, 10000.0f, off), rope_backward(xu, 10000.0f, off), 0, 0)) << what;
        // And both agree with the CPU reference.
        Tensor xc = x.to(Device::cpu());
        EXPECT_TRUE(all_close(rope_forward(x, 10000.0f, off), rope_forward(xc, 10000.0f, off), atol_of(dt),
                              rtol_of(dt)))
            << what;
      }
    }
  }
}

TEST(RopeCacheCuda, CachedCallAllocatesOnlyItsOutput) {
  OMNIQ_REQUIRE_CUDA();
  const float theta = 7777.0f;
  for (DType dt : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = Tensor::uniform({1, 256, 8, 128}, -1, 1, 41, dt, Device::cuda());
    const int64_t out_bytes = static_cast<int64_t>(x.nbytes());
    Tensor first;
    // Cold key: the table is built (more than the output is allocated).
    EXPECT_GT(peak_extra([&] { first = rope_forward(x, theta, 0); }), out_bytes);
    // Warm: forward, backward (same table, the sign is applied in the kernel) and another offset
    // inside the cached positions allocate nothing but the output.
    Tensor again, back, shifted;
    EXPECT_EQ(peak_extra([&] { again = rope_forward(x, theta, 0); }), out_bytes);
    EXPECT_EQ(peak_extra([&] { back = rope_backward(x, theta, 0); }), out_bytes);
    EXPECT_EQ(peak_extra([&] { shifted = rope_forward(x, theta, 1500); }), out_bytes);
    EXPECT_TRUE(all_close(again, first, 0, 0));
    // backward(forward(x)) = x up to rounding; and both match the CPU.
    Tensor xc = x.to(Device::cpu());
    EXPECT_TRUE(all_close(back, rope_backward(xc, theta, 0), atol_of(dt), rtol_of(dt)));
    EXPECT_TRUE(all_close(shifted, rope_forward(xc, theta, 1500), atol_of(dt), rtol_of(dt)));
  }
}

TEST(RopeCacheCuda, GrowingTheTableKeepsTheBits) {
  OMNIQ_REQUIRE_CUDA();
  const float theta = 6543.0f;
  Tensor x = Tensor::uniform({2, 64, 4, 64}, -1, 1, 51, DType::bf16, Device::cuda());
  Tensor xc = x.to(Device::cpu());
  Tensor before = rope_forward(x, theta, 100);
  // Positions past the cached range: the table is rebuilt longer, then hit.
  Tensor far = rope_forward(x, theta, 20000);
  Tensor far_again;
  EXPECT_EQ(peak_extra([&] { far_again = rope_forward(x, theta, 20000); }), static_cast<int64_t>(x.nbytes()));
  EXPECT_TRUE(all_close(far_again, far, 0, 0));
  EXPECT_TRUE(all_close(far, rope_forward(xc, theta, 20000), atol_of(DType::bf16), rtol_of(DType::bf16)));
  EXPECT_TRUE(all_close(rope_forward(x, theta, 100), before, 0, 0)) << "the longer table has the same rows";
  // A range too long to cache (D = 8: 2M positions fit in the cache limit) takes a per-call table.
  Tensor y = Tensor::uniform({1, 16, 2, 8}, -1, 1, 52, DType::f32, Device::cuda());
  const int64_t off = 3000000;
  Tensor got = rope_forward(y, theta, off);
  EXPECT_TRUE(all_close(got, rope_forward(y.to(Device::cpu()), theta, off), atol_of(DType::f32), rtol_of(DType::f32)));
  EXPECT_TRUE(all_close(rope_forward(unaligned_copy(y), theta, off), got, 0, 0));
}

#ifdef OMNIQ_HAS_CUDA
namespace {

// Captures `out.copy_from(rope_forward(x, theta, off))` on the device stream and replays it.
bool capture_and_replay(const Tensor& x, float theta, int64_t off, Tensor& out, std::string* why) {
  CudaContext& ctx = cuda_context(x.device());
  if (cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
    *why = "begin capture";
    return false;
  }
  try {
    Tensor y = rope_forward(x, theta, off);
    out.copy_from(y);
  } catch (const std::exception& e) {
    *why = e.what();
  }
  cudaGraph_t g = nullptr;
  cudaError_t end = cudaStreamEndCapture(ctx.stream, &g);
  if (!why->empty() || end != cudaSuccess) {
    if (why->empty()) *why = cudaGetErrorString(end);
    cudaGetLastError();
    if (g) cudaGraphDestroy(g);
    return false;
  }
  cudaGraphExec_t e = nullptr;
  bool ok = cudaGraphInstantiate(&e, g, 0) == cudaSuccess;
  for (int rep = 0; ok && rep < 2; ++rep) ok = cudaGraphLaunch(e, ctx.stream) == cudaSuccess;
  ok = ok && cudaStreamSynchronize(ctx.stream) == cudaSuccess;
  if (!ok) *why = cudaGetErrorString(cudaGetLastError());
  if (e) cudaGraphExecDestroy(e);
  cudaGraphDestroy(g);
  cudaDeviceGraphMemTrim(x.device().index);
  return ok;
}

}  // namespace

TEST(RopeCacheCuda, CapturedCallsAreCorrectAndLeaveNoGraphMemoryInTheCache) {
  OMNIQ_REQUIRE_CUDA();
  const float theta = 3333.0f;
  Tensor x = Tensor::uniform({1, 128, 8, 128}, -1, 1, 61, DType::bf16, Device::cuda());
  Tensor out = Tensor::zeros(x.shape(), DType::bf16, Device::cuda());
  std::string why;
  // Cold key while capturing: a per-call table inside the graph.
  ASSERT_TRUE(capture_and_replay(x, theta, 0, out, &why)) << why;
  Tensor eager;
  // The capture must not have cached its table: the first eager call still builds one.
  EXPECT_GT(peak_extra([&] { eager = rope_forward(x, theta, 0); }), static_cast<int64_t>(x.nbytes()));
  EXPECT_TRUE(all_close(out, eager, 0, 0));
  // Warm key while capturing: the graph reads the cached table.
  out.zero();
  ASSERT_TRUE(capture_and_replay(x, theta, 0, out, &why)) << why;
  EXPECT_TRUE(all_close(out, eager, 0, 0));
  // Positions beyond the cached range while capturing: per-call table again, same bits as eager.
  out.zero();
  ASSERT_TRUE(capture_and_replay(x, theta, 9000, out, &why)) << why;
  EXPECT_TRUE(all_close(out, rope_forward(x, theta, 9000), 0, 0));
}
#endif
