// The row kernels of cell_rows.h with AVX2 + FMA vectors: the same cell math
// (lstm_cell.h) instantiated on 8-float / 4-double vector types, whose exp
// come from the SLEEF routines (1-ulp) that PyTorch's CPU library exports.
// Only this file is compiled for AVX2; it runs only after a CPUID check.
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "../lstm_cell.h"
#include "cell_rows.h"

extern "C" {
__m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
__m256d Sleef_expd4_u10avx2(__m256d) __attribute__((weak));
__m256d Sleef_tanhd4_u10avx2(__m256d) __attribute__((weak));
}

namespace lstm_fused::cpu::avx2 {

struct F8 {
  using scalar = float;
  static constexpr int width = 8;
  __m256 v;
  F8() = default;
  F8(__m256 x) : v(x) {}
  F8(float s) : v(_mm256_set1_ps(s)) {}
  static __m256i mask(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx);
  }
  static F8 load(const float* p, int64_t n) {
    return n >= width ? F8(_mm256_loadu_ps(p)) : F8(_mm256_maskload_ps(p, mask(n)));
  }
  void store(float* p, int64_t n) const {
    if (n >= width) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, mask(n), v);
  }
};
inline F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
inline F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
inline F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
inline F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
inline F8 operator-(F8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline F8 exp(F8 a) { return Sleef_expf8_u10avx2(a.v); }
// tanh(a) = 2 / (1 + exp(-2a)) - 1: three times cheaper than SLEEF's tanh,
// within a few float ulps of 1 in absolute terms (the cell's scale).
inline F8 tanh(F8 a) {
  const F8 e = Sleef_expf8_u10avx2(_mm256_mul_ps(a.v, _mm256_set1_ps(-2.f)));
  return F8(2.f) / (F8(1.f) + e) - F8(1.f);
}

struct D4 {
  using scalar = double;
  static constexpr int width = 4;
  __m256d v;
  D4() = default;
  D4(__m256d x) : v(x) {}
  D4(double s) : v(_mm256_set1_pd(s)) {}
  static __m256i mask(int64_t n) {
    const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), idx);
  }
  static D4 load(const double* p, int64_t n) {
    return n >= width ? D4(_mm256_loadu_pd(p)) : D4(_mm256_maskload_pd(p, mask(n)));
  }
  void store(double* p, int64_t n) const {
    if (n >= width) _mm256_storeu_pd(p, v); else _mm256_maskstore_pd(p, mask(n), v);
  }
};
inline D4 operator+(D4 a, D4 b) { return _mm256_add_pd(a.v, b.v); }
inline D4 operator-(D4 a, D4 b) { return _mm256_sub_pd(a.v, b.v); }
inline D4 operator*(D4 a, D4 b) { return _mm256_mul_pd(a.v, b.v); }
inline D4 operator/(D4 a, D4 b) { return _mm256_div_pd(a.v, b.v); }
inline D4 operator-(D4 a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }
inline D4 exp(D4 a) { return Sleef_expd4_u10avx2(a.v); }
inline D4 tanh(D4 a) { return Sleef_tanhd4_u10avx2(a.v); }

// Every loop runs whole vectors; the tail is a masked vector, so no scalar
// instantiation of the cell math is compiled here.
template <typename V, typename T = typename V::scalar>
void forward_rows(T* g, int64_t H, T* c, T* c_saved, T* h, int64_t count) {
  for (int64_t j = 0; j < count; j += V::width) {
    const int64_t n = count - j;
    V i = V::load(g + j, n), f = V::load(g + H + j, n), gg = V::load(g + 2 * H + j, n),
      o = V::load(g + 3 * H + j, n), cn, hn;
    cell_forward(i, f, gg, o, V::load(c + j, n), cn, hn);
    i.store(g + j, n);
    f.store(g + H + j, n);
    gg.store(g + 2 * H + j, n);
    o.store(g + 3 * H + j, n);
    cn.store(c + j, n);
    cn.store(c_saved + j, n);
    hn.store(h + j, n);
  }
}

template <typename V, typename T = typename V::scalar>
void backward_rows(const T* g, int64_t H, const T* c, const T* c_prev, const T* dh, T* dc,
                   T* dg, int64_t count) {
  for (int64_t j = 0; j < count; j += V::width) {
    const int64_t n = count - j;
    V di, df, dgg, dout, dcp;
    cell_backward(V::load(g + j, n), V::load(g + H + j, n), V::load(g + 2 * H + j, n),
                  V::load(g + 3 * H + j, n), V::load(c + j, n), V::load(c_prev + j, n),
                  V::load(dh + j, n), V::load(dc + j, n), di, df, dgg, dout, dcp);
    di.store(dg + j, n);
    df.store(dg + H + j, n);
    dgg.store(dg + 2 * H + j, n);
    dout.store(dg + 3 * H + j, n);
    dcp.store(dc + j, n);
  }
}

template <typename V, typename T = typename V::scalar>
void hidden_rows(const T* g, int64_t H, const T* c, T* h, int64_t count) {
  for (int64_t j = 0; j < count; j += V::width) {
    const int64_t n = count - j;
    cell_hidden(V::load(g + 3 * H + j, n), V::load(c + j, n)).store(h + j, n);
  }
}

}  // namespace lstm_fused::cpu::avx2

namespace lstm_fused::cpu {

bool avx2_cell_rows(CellRows<float>* f, CellRows<double>* d) {
  const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  Sleef_expf8_u10avx2 && Sleef_expd4_u10avx2 &&
                  Sleef_tanhd4_u10avx2;
  if (!ok) return false;
  using avx2::D4;
  using avx2::F8;
  *f = {&avx2::forward_rows<F8>, &avx2::backward_rows<F8>, &avx2::hidden_rows<F8>, "avx2"};
  *d = {&avx2::forward_rows<D4>, &avx2::backward_rows<D4>, &avx2::hidden_rows<D4>, "avx2"};
  return true;
}

}  // namespace lstm_fused::cpu
