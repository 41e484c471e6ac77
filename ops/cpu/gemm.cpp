// CPU fp32 GEMM: OpenBLAS when available, otherwise a cache-blocked loop (see ops/cpu/gemm.h).
#include "ops/cpu/gemm.h"

#include <algorithm>
#include <climits>
#include <vector>

#include "runtime/error.h"

#ifdef OMNIQ_HAVE_CBLAS
#include <cblas.h>
#endif

namespace omniq::cpu {

namespace {

// C = beta * C for an M x N block (beta == 0 writes zeros so garbage/NaN in C is never read).
void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  if (beta == 1.0f) return;
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f) {
      std::fill(c, c + N, 0.0f);
    } else {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
}

void check_args(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                int64_t ldc) {
  OMNIQ_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_f32: negative size M=%lld N=%lld K=%lld", (long long)M,
              (long long)N, (long long)K);
  OMNIQ_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N) && ldc >= N,
              "gemm_f32: leading dimensions too small (lda=%lld ldb=%lld ldc=%lld for M=%lld N=%lld K=%lld, "
              "trans_a=%d trans_b=%d)",
              (long long)lda, (long long)ldb, (long long)ldc, (long long)M, (long long)N, (long long)K, trans_a,
              trans_b);
}

// Block sizes: a packed B panel of kKc x kNc floats (512 KiB) stays in L2, a 4-row strip of C
// (4 x kNc floats = 8 KiB) stays in L1 while the K loop streams the panel through it.
constexpr int64_t kMc = 64;
constexpr int64_t kKc = 256;
constexpr int64_t kNc = 512;

}  // namespace

void gemm_f32_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_args(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  scale_c(M, N, beta, C, ldc);
  if (K == 0 || alpha == 0.0f) return;

  // Packing makes both operands unit-stride whatever the transposes, so one inner kernel serves all
  // four cases; alpha is folded into the packed A.
  std::vector<float> ap(static_cast<size_t>(kMc * kKc));
  std::vector<float> bp(static_cast<size_t>(kKc * kNc));
  for (int64_t j0 = 0; j0 < N; j0 += kNc) {
    const int64_t nb = std::min(kNc, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kb = std::min(kKc, K - k0);
      // bp[kk][jj] = op(B)[k0 + kk][j0 + jj]
      for (int64_t kk = 0; kk < kb; ++kk) {
        float* dst = bp.data() + kk * nb;
        if (trans_b) {
          for (int64_t jj = 0; jj < nb; ++jj) dst[jj] = B[(j0 + jj) * ldb + k0 + kk];
        } else {
          const float* src = B + (k0 + kk) * ldb + j0;
          std::copy(src, src + nb, dst);
        }
      }
      for (int64_t i0 = 0; i0 < M; i0 += kMc) {
        const int64_t mb = std::min(kMc, M - i0);
        // ap[ii][kk] = alpha * op(A)[i0 + ii][k0 + kk]
        for (int64_t ii = 0; ii < mb; ++ii) {
          float* dst = ap.data() + ii * kb;
          for (int64_t kk = 0; kk < kb; ++kk)
            dst[kk] = alpha * (trans_a ? A[(k0 + kk) * lda + i0 + ii] : A[(i0 + ii) * lda + k0 + kk]);
        }
        // 4 rows of C at a time: every loaded B element feeds 4 FMAs; the jj loop vectorises.
        int64_t ii = 0;
        for (; ii + 4 <= mb; ii += 4) {
          float* __restrict c0 = C + (i0 + ii) * ldc + j0;
          float* __restrict c1 = c0 + ldc;
          float* __restrict c2 = c1 + ldc;
          float* __restrict c3 = c2 + ldc;
          const float* a = ap.data() + ii * kb;
          for (int64_t kk = 0; kk < kb; ++kk) {
            const float a0 = a[kk], a1 = a[kb + kk], a2 = a[2 * kb + kk], a3 = a[3 * kb + kk];
            const float* __restrict b = bp.data() + kk * nb;
            for (int64_t jj = 0; jj < nb; ++jj) {
              const float bv = b[jj];
              c0[jj] += a0 * bv;
              c1[jj] += a1 * bv;
              c2[jj] += a2 * bv;
              c3[jj] += a3 * bv;
            }
          }
        }
        for (; ii < mb; ++ii) {
          float* __restrict c = C + (i0 + ii) * ldc + j0;
          const float* a = ap.data() + ii * kb;
          for (int64_t kk = 0; kk < kb; ++kk) {
            const float av = a[kk];
            const float* __restrict b = bp.data() + kk * nb;
            for (int64_t jj = 0; jj < nb; ++jj) c[jj] += av * b[jj];
          }
        }
      }
    }
  }
}

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#ifdef OMNIQ_HAVE_CBLAS
  check_args(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS rejects lda = 0; the product is empty, so only the beta scaling remains
    scale_c(M, N, beta, C, ldc);
    return;
  }
  const int64_t biggest = std::max({M, N, K, lda, ldb, ldc});
  if (biggest <= INT_MAX) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
                static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
    return;
  }
  // Sizes beyond 32-bit BLAS integers: fall through to the blocked loop (64-bit indices).
#endif
  gemm_f32_blocked(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

bool gemm_uses_blas() {
#ifdef OMNIQ_HAVE_CBLAS
  return true;
#else
  return false;
#endif
}

}  // namespace omniq::cpu
