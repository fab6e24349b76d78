// Row-major GEMM on raw pointers for the CPU kernels.
//
// Uses the Fortran BLAS (sgemm_/dgemm_) that the PyTorch CPU library exports
// (MKL on x86-64 wheels), looked up as weak symbols so the extension still
// loads where they are missing; there a plain loop is used instead.
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major.
// op(A) is [M,K] (A stored [K,M] when trans_a), op(B) is [K,N] (B stored
// [N,K] when trans_b). beta == 0 ignores what C held (NaN included).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
          const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
          int64_t ldc);

}  // namespace lstm_fused::cpu
