// GEMM-based ops: the Linear layer (forward/backward) and batched matrix products.
//
// Every product accumulates in fp32 whatever the storage dtype (f32, bf16, f16). On CUDA the f32
// path uses CUBLAS_COMPUTE_32F (no TF32), so f32 results match the CPU reference to ~1e-5.
#pragma once
#include <cstdint>
#include <optional>

#include "runtime/tensor.h"

namespace omniq {

// Y = X · Wᵀ (+ b) (+ r).  x: [..., K] (any rank 1-4; rows = product of the leading dims), w: [N, K],
// bias: [N] in x's dtype or null, residual: [..., N] (x's leading dims) in x's dtype or null.
// Returns [..., N] in x's dtype. x and w share dtype and device.
// The residual is the `h = r + Linear(x)` of a transformer block folded into the GEMM epilogue
// (cuBLASLt D = A·B + 1·C with C = r, D = y): the sum is formed in fp32 and rounded ONCE, which
// saves the separate add kernel (a read of two tensors and a write of one) and one bf16 rounding.
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias = nullptr,
                      const Tensor* residual = nullptr);

// Gradients of linear_forward for an upstream gradient dy [..., N] (x's dtype):
//   dx = dy · W       [..., K] in x's dtype
//   dw = dyᵀ · X      [N, K]   in dw_dtype: f32 (default: it feeds fp32 parameter gradients) or x's
//                              dtype (a bf16 fake-quantized weight's gradient, as under autocast:
//                              half the bytes written and read back); fp32 accumulation either way
//   db = Σ_rows dy    [N]      in f32
// Gradients not requested are left undefined. Fresh tensors: the caller accumulates.
struct LinearGrads {
  Tensor dx, dw, db;
};
LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db, DType dw_dtype = DType::f32);

// dx += dy · W, accumulated by the GEMM itself (β = 1, in place): dy [..., N], w [N, K], dx [..., K]
// with dy's rows, all in one dtype on one device; fp32 sum of the old dx and the product, rounded
// once. Autograd uses it when an input already holds a gradient buffer (a Linear input read by
// several Linears), instead of a fresh dx followed by an add_inplace pass. dx must not share
// storage with dy or w.
void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx);

// Batched C[i] = alpha · op(A[i]) · op(B[i]) over the leading (batch) dims.
//   a: [..., M, K] (or [..., K, M] when trans_a), b: [..., K, N] (or [..., N, K] when trans_b),
//   with identical leading dims (2-D inputs are one batch). Returns [..., M, N] in out_dtype,
//   which defaults to a's dtype; f32 output from bf16/f16 inputs keeps the full fp32 accumulator.
Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha = 1.f,
           std::optional<DType> out_dtype = std::nullopt);

namespace cpu {
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* residual = nullptr);
LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db);  // dw in f32
void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx);
Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha, DType out_dtype);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* residual = nullptr);
LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db, DType dw_dtype);
void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx);
Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha, DType out_dtype);

// The raw strided-batched GEMM other CUDA ops build on (row-major, BLAS semantics as cpu::gemm_f32):
//   D[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i],  X[i] = X + i · stride_x   (i < batch)
//   (+ bias[n] broadcast over rows when bias != nullptr; bias has c_type and needs batch == 1).
// D is C (in place) unless D is set: then C is only read (when beta != 0) and may be a const
// tensor; D has C's layout (ldc, stride_c, c_type) and must not overlap C partially.
// A and B have ab_type; (ab_type, c_type) must be (f32, f32), (bf16, bf16|f32) or (f16, f16|f32).
// Queued on the device's context stream; descriptors and the heuristic's algorithm are cached per
// shape/strides/dtypes/alignment, so repeated calls cost only the cublasLtMatmul launch.
struct GemmArgs {
  int device = 0;
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.f, beta = 0.f;
  DType ab_type = DType::f32, c_type = DType::f32;
  const void* A = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* B = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* C = nullptr;
  int64_t ldc = 0, stride_c = 0;
  void* D = nullptr;  // output; null: C
  int64_t batch = 1;
  const void* bias = nullptr;
};
void gemm(const GemmArgs& g);
}  // namespace cuda
#endif

}  // namespace omniq
