#include "blas.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
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

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

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

#if defined(CPUBLAS_BRGEMM_F32F32F32)
namespace {
// One probe at load: the kernel must exist on this machine and be right.
bool probe_brgemm() {
  const char* env = std::getenv("LSTM_FUSED_NO_BRGEMM");
  if (env != nullptr && env[0] != '\0' && env[0] != '0') return false;
  try {
    const float a[2] = {1.f, 2.f}, b[2] = {3.f, 4.f};
    float c[1] = {0.f};
    at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, c, false);
    at::native::cpublas::brgemm_release(false);
    return c[0] == 11.f;
  } catch (...) {
    return false;
  }
}
}  // namespace

bool have_brgemm() {
  static const bool ok = probe_brgemm();
  return ok;
}
void brgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
            const float* B, int64_t ldb, float* C, int64_t ldc, bool add) {
  if (M > 0 && N > 0) at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}
void brgemm_done() { at::native::cpublas::brgemm_release(false); }
#else
bool have_brgemm() { return false; }
void brgemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
            float*, int64_t, bool) {}
void brgemm_done() {}
#endif

template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, T* C, int64_t ldc, bool add) {
  if constexpr (std::is_same_v<T, float>) {
    if (have_brgemm() && K > 0) {
      // Tiles of C across threads; a long K runs in chunks so that a chunk
      // of B's panel stays in cache.
      constexpr int64_t mb = 128, nb = 64, kb = 512;
      const int64_t tm = (M + mb - 1) / mb, tn = (N + nb - 1) / nb;
      at::parallel_for(0, tm * tn, 1, [&](int64_t s, int64_t e) {
        for (int64_t t = s; t < e; ++t) {
          const int64_t m0 = (t / tn) * mb, n0 = (t % tn) * nb;
          for (int64_t k0 = 0; k0 < K; k0 += kb)
            brgemm(std::min(mb, M - m0), std::min(nb, N - n0), std::min(kb, K - k0),
                   A + m0 * lda + k0, lda, B + k0 * ldb + n0, ldb, C + m0 * ldc + n0, ldc,
                   add || k0 > 0);
        }
        brgemm_done();
      });
      return;
    }
  }
  gemm<T>(false, false, M, N, K, T(1), A, lda, B, ldb, add ? T(1) : T(0), C, ldc);
}

template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, T* out) {
  constexpr int64_t tile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += tile)
    for (int64_t c0 = 0; c0 < cols; c0 += tile)
      for (int64_t r = r0; r < std::min(rows, r0 + tile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tile); ++c) out[c * rows + r] = in[r * cols + c];
}

template void transpose<float>(const float*, int64_t, int64_t, float*);
template void transpose<double>(const double*, int64_t, int64_t, double*);
template void gemm_nn<float>(int64_t, int64_t, int64_t, const float*, int64_t,
                             const float*, int64_t, float*, int64_t, bool);
template void gemm_nn<double>(int64_t, int64_t, int64_t, const double*, int64_t,
                              const double*, int64_t, double*, int64_t, bool);

}  // namespace lstm_fused::cpu
