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

// True when an optimized BLAS was found at load time.
bool have_blas();

// Small-GEMM kernel on the calling thread: C[M,N] = A[M,K] B[K,N] (+ C when
// add), row-major, B not transposed. PyTorch's CPU library provides it for
// float (oneDNN's JIT brgemm; faster than the BLAS for the skinny products of
// a recurrence). Only call when have_brgemm(); call brgemm_done() when a
// thread has finished a batch of calls.
bool have_brgemm();
void brgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
            const float* B, int64_t ldb, float* C, int64_t ldc, bool add);
void brgemm_done();

// C[M,N] = A[M,K] B[K,N] (+ C when add), row-major, tiled across threads with
// brgemm for float when available, else one gemm() call.
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, T* C, int64_t ldc, bool add);

// [rows, cols] -> [cols, rows], row-major, in cache-sized tiles.
template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, T* out);

}  // namespace lstm_fused::cpu
