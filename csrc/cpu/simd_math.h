// exp and tanh for the float vector types of simd_avx2.h (F8) and
// simd_avx512.h (F16), written once over the vector type's operators and its
// few extra primitives (vmin, vmax, round, pow2, gt, select).
//
// exp_n: exp of N vectors in place, in lock-step: each step of the
// evaluation is done for all N before the next, so the long chain of
// dependent operations of one vector overlaps with the others'.
// exp(x) = 2^n e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r from Cephes'
// degree-6 polynomial: within 2 ulp on [-87, 88]. Below -87.3 it is 0 or a
// denormal-sized value, above 88.7 (and for +Inf) +Inf, NaN stays NaN (vmin
// and vmax return their second operand when one is NaN), so sigmoid and tanh
// reach exactly 0, ±1 where they saturate, as the scalar functions do.
#pragma once

namespace lstm_fused::cpu {

#define LF_MATH_INLINE __attribute__((always_inline)) inline

template <class V, int N>
LF_MATH_INLINE void exp_n(V (&x)[N]) {
  V n[N], p[N];
  typename V::cmp_mask big[N];
  for (int i = 0; i < N; ++i) {
    big[i] = V::gt(x[i], V(88.72f));
    x[i] = V::vmax(V(-87.3365f), V::vmin(V(88.3762f), x[i]));
  }
  for (int i = 0; i < N; ++i) n[i] = V::round(x[i] * V(1.44269504088896341f));
  for (int i = 0; i < N; ++i) x[i] = fma(-n[i], V(0.693359375f), x[i]);
  for (int i = 0; i < N; ++i) x[i] = fma(-n[i], V(-2.12194440e-4f), x[i]);
  for (int i = 0; i < N; ++i) p[i] = fma(V(1.9875691500e-4f), x[i], V(1.3981999507e-3f));
  for (int i = 0; i < N; ++i) p[i] = fma(p[i], x[i], V(8.3334519073e-3f));
  for (int i = 0; i < N; ++i) p[i] = fma(p[i], x[i], V(4.1665795894e-2f));
  for (int i = 0; i < N; ++i) p[i] = fma(p[i], x[i], V(1.6666665459e-1f));
  for (int i = 0; i < N; ++i) p[i] = fma(p[i], x[i], V(5.0000001201e-1f));
  for (int i = 0; i < N; ++i) p[i] = fma(p[i], x[i] * x[i], x[i] + V(1.f));
  for (int i = 0; i < N; ++i) x[i] = V::select(big[i], V(__builtin_inff()), p[i] * V::pow2(n[i]));
}

// tanh(a) = 2 / (1 + exp(-2a)) - 1 of N vectors in place: within a few float
// ulps of 1 in absolute terms (the scale of the cell), and exactly ±1 where
// tanh saturates.
template <class V, int N>
LF_MATH_INLINE void tanh_n(V (&x)[N]) {
  for (int i = 0; i < N; ++i) x[i] = x[i] * V(-2.f);
  exp_n(x);
  for (int i = 0; i < N; ++i) x[i] = V(2.f) / (V(1.f) + x[i]) - V(1.f);
}

}  // namespace lstm_fused::cpu
