// AVX-512 vector types for the CPU kernels: 16 floats (F16) and 8 doubles
// (D8), the same interface as simd_avx2.h (lstm_cell.h's arithmetic, masked
// loads/stores for the tails, broadcast, fused multiply-add, lane sums).
// Masked loads read nothing past the mask. Include only from a translation
// unit compiled for AVX-512 (F, DQ, BW, VL) whose functions run after a CPUID
// check.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd_math.h"
#include "simd_pair.h"

extern "C" {
// SLEEF's 1-ulp routines, exported by PyTorch's CPU library.
__m512d Sleef_expd8_u10avx512f(__m512d) __attribute__((weak));
__m512d Sleef_tanhd8_u10avx512f(__m512d) __attribute__((weak));
}

namespace lstm_fused::cpu::avx512 {

// Vector registers: enough for fused_engine.h's gate tiles (6 rows by the
// four gates of a vector of units: 24 accumulators).
constexpr int kRegisters = 32;

#define LF_INLINE __attribute__((always_inline)) inline

// The first n (<= 0: none, >= 16: all) of 16 lanes.
LF_INLINE __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

struct F16 {
  using scalar = float;
  static constexpr int width = 16;
  __m512 v;
  F16() = default;
  LF_INLINE F16(__m512 x) : v(x) {}
  LF_INLINE F16(float s) : v(_mm512_set1_ps(s)) {}
  static LF_INLINE F16 zero() { return _mm512_setzero_ps(); }
  static LF_INLINE F16 load(const float* p) { return _mm512_loadu_ps(p); }
  // The first n lanes, the others 0 (nothing past them is read).
  static LF_INLINE F16 load(const float* p, int64_t n) {
    return n >= width ? F16(_mm512_loadu_ps(p)) : F16(_mm512_maskz_loadu_ps(mask16(n), p));
  }
  static LF_INLINE F16 bcast(const float* p) { return _mm512_set1_ps(*p); }
  LF_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  LF_INLINE void store(float* p, int64_t n) const {
    if (n >= width) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, mask16(n), v);
  }
  // Lane k of the result: the sum of all lanes of s[k]: each vector's two
  // halves added, then the AVX2 way (horizontal adds) on each group of 8.
  static LF_INLINE F16 sums(const F16 (&s)[16]) {
    __m256 h[16];
    for (int j = 0; j < 16; ++j)
      h[j] = _mm256_add_ps(_mm512_castps512_ps256(s[j].v), _mm512_extractf32x8_ps(s[j].v, 1));
    return _mm512_insertf32x8(_mm512_castps256_ps512(sums8(h)), sums8(h + 8), 1);
  }
  // Lane k: the sum of the lanes of h[k], k < 8.
  static LF_INLINE __m256 sums8(const __m256* h) {
    const __m256 ab = _mm256_hadd_ps(h[0], h[1]), cd = _mm256_hadd_ps(h[2], h[3]);
    const __m256 ef = _mm256_hadd_ps(h[4], h[5]), gh = _mm256_hadd_ps(h[6], h[7]);
    const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
    return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20),
                         _mm256_permute2f128_ps(abcd, efgh, 0x31));
  }
  // For simd_math.h's exp.
  using cmp_mask = __mmask16;
  static LF_INLINE F16 vmin(F16 a, F16 b) { return _mm512_min_ps(a.v, b.v); }
  static LF_INLINE F16 vmax(F16 a, F16 b) { return _mm512_max_ps(a.v, b.v); }
  static LF_INLINE F16 round(F16 a) {
    return _mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-127, 128].
  static LF_INLINE F16 pow2(F16 n) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23));
  }
  static LF_INLINE cmp_mask gt(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  static LF_INLINE F16 select(cmp_mask m, F16 yes, F16 no) { return _mm512_mask_blend_ps(m, no.v, yes.v); }
};
LF_INLINE F16 operator+(F16 a, F16 b) { return _mm512_add_ps(a.v, b.v); }
LF_INLINE F16 operator-(F16 a, F16 b) { return _mm512_sub_ps(a.v, b.v); }
LF_INLINE F16 operator*(F16 a, F16 b) { return _mm512_mul_ps(a.v, b.v); }
LF_INLINE F16 operator/(F16 a, F16 b) { return _mm512_div_ps(a.v, b.v); }
LF_INLINE F16 operator-(F16 a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)));
}
LF_INLINE F16 fma(F16 a, F16 b, F16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }

LF_INLINE F16 exp(F16 a) {
  F16 v[1] = {a};
  exp_n(v);
  return v[0];
}
LF_INLINE F16 tanh(F16 a) {
  F16 v[1] = {a};
  tanh_n(v);
  return v[0];
}
LF_INLINE void exp_pair(F16& a, F16& b) {
  F16 v[2] = {a, b};
  exp_n(v);
  a = v[0], b = v[1];
}
LF_INLINE void tanh_pair(F16& a, F16& b) {
  F16 v[2] = {a, b};
  tanh_n(v);
  a = v[0], b = v[1];
}

LF_INLINE __mmask8 mask8(int64_t n) {
  return n >= 8 ? __mmask8(0xFF) : n <= 0 ? __mmask8(0) : __mmask8((1u << n) - 1);
}

struct D8 {
  using scalar = double;
  static constexpr int width = 8;
  __m512d v;
  D8() = default;
  LF_INLINE D8(__m512d x) : v(x) {}
  LF_INLINE D8(double s) : v(_mm512_set1_pd(s)) {}
  static LF_INLINE D8 zero() { return _mm512_setzero_pd(); }
  static LF_INLINE D8 load(const double* p) { return _mm512_loadu_pd(p); }
  static LF_INLINE D8 load(const double* p, int64_t n) {
    return n >= width ? D8(_mm512_loadu_pd(p)) : D8(_mm512_maskz_loadu_pd(mask8(n), p));
  }
  static LF_INLINE D8 bcast(const double* p) { return _mm512_set1_pd(*p); }
  LF_INLINE void store(double* p) const { _mm512_storeu_pd(p, v); }
  LF_INLINE void store(double* p, int64_t n) const {
    if (n >= width) _mm512_storeu_pd(p, v); else _mm512_mask_storeu_pd(p, mask8(n), v);
  }
  // Lane k of the result: the sum of all lanes of s[k] (as F16::sums).
  static LF_INLINE D8 sums(const D8 (&s)[8]) {
    __m256d h[8];
    for (int j = 0; j < 8; ++j)
      h[j] = _mm256_add_pd(_mm512_castpd512_pd256(s[j].v), _mm512_extractf64x4_pd(s[j].v, 1));
    return _mm512_insertf64x4(_mm512_castpd256_pd512(sums4(h)), sums4(h + 4), 1);
  }
  static LF_INLINE __m256d sums4(const __m256d* h) {
    const __m256d ab = _mm256_hadd_pd(h[0], h[1]), cd = _mm256_hadd_pd(h[2], h[3]);
    return _mm256_add_pd(_mm256_permute2f128_pd(ab, cd, 0x20), _mm256_permute2f128_pd(ab, cd, 0x31));
  }
};
LF_INLINE D8 operator+(D8 a, D8 b) { return _mm512_add_pd(a.v, b.v); }
LF_INLINE D8 operator-(D8 a, D8 b) { return _mm512_sub_pd(a.v, b.v); }
LF_INLINE D8 operator*(D8 a, D8 b) { return _mm512_mul_pd(a.v, b.v); }
LF_INLINE D8 operator/(D8 a, D8 b) { return _mm512_div_pd(a.v, b.v); }
LF_INLINE D8 operator-(D8 a) {
  return _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)));
}
LF_INLINE D8 fma(D8 a, D8 b, D8 c) { return _mm512_fmadd_pd(a.v, b.v, c.v); }
LF_INLINE D8 exp(D8 a) { return Sleef_expd8_u10avx512f(a.v); }
LF_INLINE D8 tanh(D8 a) { return Sleef_tanhd8_u10avx512f(a.v); }
LF_INLINE void exp_pair(D8& a, D8& b) { a = exp(a), b = exp(b); }
LF_INLINE void tanh_pair(D8& a, D8& b) { a = tanh(a), b = tanh(b); }

inline bool have_double_math() { return Sleef_expd8_u10avx512f && Sleef_tanhd8_u10avx512f; }

template <typename T> struct Vec;
template <> struct Vec<float> { using type = F16; };
template <> struct Vec<double> { using type = D8; };

}  // namespace lstm_fused::cpu::avx512
