// AVX2 + FMA vector types for the CPU kernels: 8 floats (F8) and 4 doubles
// (D4) with the arithmetic lstm_cell.h needs, masked loads/stores for the
// tails, broadcast and fused multiply-add. Include only from a translation
// unit compiled for AVX2 (`#pragma GCC target("avx2,fma")` before any
// include) whose functions run after a CPUID check.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd_math.h"
#include "simd_pair.h"

extern "C" {
// SLEEF's 1-ulp routines, exported by PyTorch's CPU library.
__m256d Sleef_expd4_u10avx2(__m256d) __attribute__((weak));
__m256d Sleef_tanhd4_u10avx2(__m256d) __attribute__((weak));
}

namespace lstm_fused::cpu::avx2 {

// Vector registers: too few for fused_engine.h's gate tiles.
constexpr int kRegisters = 16;

#define LF_INLINE __attribute__((always_inline)) inline

struct F8 {
  using scalar = float;
  static constexpr int width = 8;
  __m256 v;
  F8() = default;
  LF_INLINE F8(__m256 x) : v(x) {}
  LF_INLINE F8(float s) : v(_mm256_set1_ps(s)) {}
  static LF_INLINE __m256i mask(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx);
  }
  static LF_INLINE F8 zero() { return _mm256_setzero_ps(); }
  static LF_INLINE F8 load(const float* p) { return _mm256_loadu_ps(p); }
  // n < width: the first n lanes, the others 0 (nothing past them is read).
  static LF_INLINE F8 load(const float* p, int64_t n) {
    return n >= width ? F8(_mm256_loadu_ps(p)) : F8(_mm256_maskload_ps(p, mask(n)));
  }
  static LF_INLINE F8 bcast(const float* p) { return _mm256_broadcast_ss(p); }
  LF_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
  LF_INLINE void store(float* p, int64_t n) const {
    if (n >= width) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, mask(n), v);
  }
  // Lane k of the result: the sum of all lanes of s[k].
  static LF_INLINE F8 sums(const F8 (&s)[8]) {
    const __m256 ab = _mm256_hadd_ps(s[0].v, s[1].v), cd = _mm256_hadd_ps(s[2].v, s[3].v);
    const __m256 ef = _mm256_hadd_ps(s[4].v, s[5].v), gh = _mm256_hadd_ps(s[6].v, s[7].v);
    const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
    // abcd = [a0123 b0123 c0123 d0123 | a4567 ...]: add the two halves.
    const __m256 lo = _mm256_permute2f128_ps(abcd, efgh, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(abcd, efgh, 0x31);
    return _mm256_add_ps(lo, hi);
  }
  // For simd_math.h's exp.
  using cmp_mask = __m256;
  static LF_INLINE F8 vmin(F8 a, F8 b) { return _mm256_min_ps(a.v, b.v); }
  static LF_INLINE F8 vmax(F8 a, F8 b) { return _mm256_max_ps(a.v, b.v); }
  static LF_INLINE F8 round(F8 a) {
    return _mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-127, 128].
  static LF_INLINE F8 pow2(F8 n) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23));
  }
  static LF_INLINE cmp_mask gt(F8 a, F8 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
  static LF_INLINE F8 select(cmp_mask m, F8 yes, F8 no) { return _mm256_blendv_ps(no.v, yes.v, m); }
};
LF_INLINE F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
LF_INLINE F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
LF_INLINE F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
LF_INLINE F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
LF_INLINE F8 operator-(F8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
LF_INLINE F8 fma(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }

LF_INLINE F8 exp(F8 a) {
  F8 v[1] = {a};
  exp_n(v);
  return v[0];
}
LF_INLINE F8 tanh(F8 a) {
  F8 v[1] = {a};
  tanh_n(v);
  return v[0];
}
LF_INLINE void exp_pair(F8& a, F8& b) {
  F8 v[2] = {a, b};
  exp_n(v);
  a = v[0], b = v[1];
}
LF_INLINE void tanh_pair(F8& a, F8& b) {
  F8 v[2] = {a, b};
  tanh_n(v);
  a = v[0], b = v[1];
}

struct D4 {
  using scalar = double;
  static constexpr int width = 4;
  __m256d v;
  D4() = default;
  LF_INLINE D4(__m256d x) : v(x) {}
  LF_INLINE D4(double s) : v(_mm256_set1_pd(s)) {}
  static LF_INLINE __m256i mask(int64_t n) {
    const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), idx);
  }
  static LF_INLINE D4 zero() { return _mm256_setzero_pd(); }
  static LF_INLINE D4 load(const double* p) { return _mm256_loadu_pd(p); }
  static LF_INLINE D4 load(const double* p, int64_t n) {
    return n >= width ? D4(_mm256_loadu_pd(p)) : D4(_mm256_maskload_pd(p, mask(n)));
  }
  static LF_INLINE D4 bcast(const double* p) { return _mm256_broadcast_sd(p); }
  LF_INLINE void store(double* p) const { _mm256_storeu_pd(p, v); }
  LF_INLINE void store(double* p, int64_t n) const {
    if (n >= width) _mm256_storeu_pd(p, v); else _mm256_maskstore_pd(p, mask(n), v);
  }
  // Lane k of the result: the sum of all lanes of s[k].
  static LF_INLINE D4 sums(const D4 (&s)[4]) {
    const __m256d ab = _mm256_hadd_pd(s[0].v, s[1].v), cd = _mm256_hadd_pd(s[2].v, s[3].v);
    // ab = [a01 b01 | a23 b23]
    const __m256d lo = _mm256_permute2f128_pd(ab, cd, 0x20);
    const __m256d hi = _mm256_permute2f128_pd(ab, cd, 0x31);
    return _mm256_add_pd(lo, hi);
  }
};
LF_INLINE D4 operator+(D4 a, D4 b) { return _mm256_add_pd(a.v, b.v); }
LF_INLINE D4 operator-(D4 a, D4 b) { return _mm256_sub_pd(a.v, b.v); }
LF_INLINE D4 operator*(D4 a, D4 b) { return _mm256_mul_pd(a.v, b.v); }
LF_INLINE D4 operator/(D4 a, D4 b) { return _mm256_div_pd(a.v, b.v); }
LF_INLINE D4 operator-(D4 a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }
LF_INLINE D4 fma(D4 a, D4 b, D4 c) { return _mm256_fmadd_pd(a.v, b.v, c.v); }
LF_INLINE D4 exp(D4 a) { return Sleef_expd4_u10avx2(a.v); }
LF_INLINE D4 tanh(D4 a) { return Sleef_tanhd4_u10avx2(a.v); }
LF_INLINE void exp_pair(D4& a, D4& b) { a = exp(a), b = exp(b); }
LF_INLINE void tanh_pair(D4& a, D4& b) { a = tanh(a), b = tanh(b); }

inline bool have_double_math() { return Sleef_expd4_u10avx2 && Sleef_tanhd4_u10avx2; }

// The vector type of a scalar type.
template <typename T> struct Vec;
template <> struct Vec<float> { using type = F8; };
template <> struct Vec<double> { using type = D4; };

}  // namespace lstm_fused::cpu::avx2
