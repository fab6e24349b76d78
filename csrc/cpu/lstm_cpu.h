// Fused LSTM layer kernels for the CPU: one layer, one direction, the whole
// sequence. Raw pointers, row-major, no framework types.
//
// Sequences are "packed": step t holds batch_sizes[t] rows, rows of all steps
// stored one after another (a padded [T, B] input is the case batch_sizes[t]
// == B). Only the first batch_sizes[t] rows are active at step t; a reverse
// layer walks t = T-1 .. 0, picking up a row's initial state when it becomes
// active. Sizes: I input, H hidden, P = proj_size or H (width of h).
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

struct LayerDims {
  int64_t steps;               // T
  const int64_t* batch_sizes;  // [T], non-increasing, batch_sizes[0] == B
  int64_t rows;                // N = sum(batch_sizes)
  int64_t batch;               // B
  int64_t input;               // I
  int64_t hidden;              // H
  int64_t proj;                // P (== H without projection)
  bool reverse;
};

template <typename T>
struct ForwardArgs {
  const T* x;     // [N, I]
  const T* h0;    // [B, P]
  const T* c0;    // [B, H]
  const T* w_ih;  // [4H, I]
  const T* w_hh;  // [4H, P]
  const T* b_ih;  // [4H] or null
  const T* b_hh;  // [4H] or null
  const T* w_hr;  // [P, H] or null (no projection)
  T* y;           // [N, P] out: h of every step
  T* h_n;         // [B, P] out: last h of every row
  T* c_n;         // [B, H] out
  // Saved for backward: gate activations [N, 4H] and cells [N, H], which is
  // 5*N*H values on top of the output; nothing else is kept.
  T* gates;
  T* cells;
};

template <typename T>
struct BackwardArgs {
  const T* dy;    // [N, P] or null (zero)
  const T* dh_n;  // [B, P] or null
  const T* dc_n;  // [B, H] or null
  const T* x;
  const T* h0;
  const T* c0;
  const T* w_ih;
  const T* w_hh;
  const T* w_hr;  // or null
  const T* y;
  const T* gates;
  const T* cells;
  T* dx;     // [N, I], or null: not computed (the input needs no gradient)
  T* dh0;    // [B, P]
  T* dc0;    // [B, H]
  T* dw_ih;  // [4H, I]
  T* dw_hh;  // [4H, P]
  T* db;     // [4H] (the gradient of b_ih and of b_hh alike) or null
  T* dw_hr;  // [P, H] or null
};

template <typename T>
void layer_forward(const LayerDims& d, const ForwardArgs<T>& a);

template <typename T>
void layer_backward(const LayerDims& d, const BackwardArgs<T>& a);

}  // namespace lstm_fused::cpu
