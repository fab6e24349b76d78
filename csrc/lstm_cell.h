// LSTM cell math, written once and shared by the CPU and CUDA kernels.
//
// Gate order is PyTorch's: i, f, g, o. Forward turns the four pre-activations
// into activations in place and produces c' = f*c + i*g and h' = o*tanh(c').
// Backward takes the saved activations and returns the pre-activation
// gradients plus dc for the previous step. Everything here is plain arithmetic
// on one scalar type T (float/double; the CUDA kernels call it with float for
// half/bfloat16 storage), so it compiles for host and device alike.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LSTM_HD __attribute__((always_inline)) inline  // vector types pass by register
#else
#define LSTM_HD inline
#endif

namespace lstm_fused {

template <typename T>
LSTM_HD T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
LSTM_HD T tanh_act(T x) {
  using std::tanh;
  return tanh(x);
}

// In: pre-activations i, f, g, o and the previous cell c_prev.
// Out: i, f, g, o replaced by their activations; c and h of this step
// (h is o*tanh(c), before any projection).
template <typename T>
LSTM_HD void cell_forward(T& i, T& f, T& g, T& o, T c_prev, T& c, T& h) {
  i = sigmoid(i);
  f = sigmoid(f);
  g = tanh_act(g);
  o = sigmoid(o);
  c = f * c_prev + i * g;
  h = o * tanh_act(c);
}

// h before projection, recomputed from the saved activation o and cell c.
template <typename T>
LSTM_HD T cell_hidden(T o, T c) {
  return o * tanh_act(c);
}

// In: activations i, f, g, o, this step's c, the previous c_prev, the
// gradient dh of h (before projection) and dc of c arriving from later steps.
// Out: gradients of the four pre-activations and of c_prev.
template <typename T>
LSTM_HD void cell_backward(T i, T f, T g, T o, T c, T c_prev, T dh, T dc,
                           T& di, T& df, T& dg, T& dout, T& dc_prev) {
  const T tc = tanh_act(c);
  const T dc_total = dc + dh * o * (T(1) - tc * tc);
  dout = dh * tc * o * (T(1) - o);
  di = dc_total * g * i * (T(1) - i);
  df = dc_total * c_prev * f * (T(1) - f);
  dg = dc_total * i * (T(1) - g * g);
  dc_prev = dc_total * f;
}

}  // namespace lstm_fused
