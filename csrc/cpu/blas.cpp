#include "blas.h"

#include <algorithm>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace lstm_fused::cpu {
namespace {

template <typename T>
void gemm_loop(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
               const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
               int64_t ldc) {
  std::vector<T> row(N);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(row.begin(), row.end(), T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = ta ? A[k * lda + m] : A[m * lda + k];
      for (int64_t n = 0; n < N; ++n) row[n] += a * (tb ? B[n * ldb + k] : B[k * ldb + n]);
    }
    T* c = C + m * ldc;
    for (int64_t n = 0; n < N; ++n)
      c[n] = alpha * row[n] + (beta == T(0) ? T(0) : beta * c[n]);
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
template <typename T, typename F>
void call_blas(F fn, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
               const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
               int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int m = int(N), n = int(M), k = int(K);
  const int la = int(std::max<int64_t>(ldb, 1)), lb = int(std::max<int64_t>(lda, 1));
  const int lc = int(std::max<int64_t>(ldc, 1));
  fn(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && K > 0)
    call_blas(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    gemm_loop(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <>
void gemm<double>(bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                  double alpha, const double* A, int64_t lda, const double* B,
                  int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (dgemm_ != nullptr && K > 0)
    call_blas(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    gemm_loop(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace lstm_fused::cpu
