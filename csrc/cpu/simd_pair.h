// Two vectors as one value (the 2 * width units of a chunk): every operation
// is done on both, so the cell's long chains of dependent operations come in
// independent pairs. exp and tanh go to the vector type's exp_pair/tanh_pair
// (float's run both in lock-step). Used by simd_avx2.h and simd_avx512.h,
// each in its own instruction-set translation unit.
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

#define LF_PAIR_INLINE __attribute__((always_inline)) inline

template <class V>
struct X2 {
  using scalar = typename V::scalar;
  static constexpr int width = 2 * V::width;
  V a, b;
  X2() = default;
  LF_PAIR_INLINE X2(V x, V y) : a(x), b(y) {}
  LF_PAIR_INLINE X2(scalar s) : a(s), b(s) {}
  static LF_PAIR_INLINE X2 load(const scalar* p, int64_t n) {
    return {V::load(p, n), V::load(p + V::width, n - V::width)};
  }
  LF_PAIR_INLINE void store(scalar* p, int64_t n) const {
    a.store(p, n);
    b.store(p + V::width, n - V::width);
  }
};
template <class V> LF_PAIR_INLINE X2<V> operator+(X2<V> x, X2<V> y) { return {x.a + y.a, x.b + y.b}; }
template <class V> LF_PAIR_INLINE X2<V> operator-(X2<V> x, X2<V> y) { return {x.a - y.a, x.b - y.b}; }
template <class V> LF_PAIR_INLINE X2<V> operator*(X2<V> x, X2<V> y) { return {x.a * y.a, x.b * y.b}; }
template <class V> LF_PAIR_INLINE X2<V> operator/(X2<V> x, X2<V> y) { return {x.a / y.a, x.b / y.b}; }
template <class V> LF_PAIR_INLINE X2<V> operator-(X2<V> x) { return {-x.a, -x.b}; }
template <class V> LF_PAIR_INLINE X2<V> exp(X2<V> x) {
  exp_pair(x.a, x.b);
  return x;
}
template <class V> LF_PAIR_INLINE X2<V> tanh(X2<V> x) {
  tanh_pair(x.a, x.b);
  return x;
}

}  // namespace lstm_fused::cpu
