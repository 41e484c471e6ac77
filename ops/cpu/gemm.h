// The one fp32 GEMM of the CPU backend, shared by every CPU op that multiplies matrices.
//
// Row-major BLAS semantics: C = alpha * op(A) * op(B) + beta * C, where op(A) is M x K and op(B) is
// K x N. A is stored row-major as M x K (lda >= K) or, when trans_a, as K x M (lda >= M); likewise
// B is K x N (ldb >= N) or, when trans_b, N x K (ldb >= K). C is M x N with ldc >= N.
// beta == 0 overwrites C without reading it (NaNs in an uninitialised C do not leak through).
#pragma once
#include <cstdint>

namespace omniq::cpu {

// OpenBLAS cblas_sgemm when the library was built with it (OMNIQ_HAVE_CBLAS), else the blocked loop.
void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The built-in cache-blocked kernel, always compiled so tests can check it even when BLAS is used.
void gemm_f32_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// True when gemm_f32 goes to BLAS (for test/bench messages).
bool gemm_uses_blas();

}  // namespace omniq::cpu
