// The per-step CUDA kernels of one LSTM layer (csrc/cuda/lstm_cuda.cu), on
// raw pointers; the layer loop around them, with its GEMMs, is in
// lstm_cuda_ops.cpp.
//
// T is the storage type (float, double, c10::Half, c10::BFloat16) and A the
// type the math runs in (float for the half types, else T). Pointers to the
// rows of one step start at that step's first row; row b of a step is the
// b-th sequence of the (sorted) batch. Sizes: H hidden, P = proj_size or H.
#pragma once

#include "platform.h"

namespace lstm_fused::cuda {

// The most batch rows one step kernel takes (gridDim.y is at most 65535).
constexpr int kMaxBatch = 65535 * 16;

template <typename T, typename A>
struct ForwardStep {
  const T* w_hh;    // [4H, P]
  const A* xg;      // [n, 4H] x W_ih^T of this step (may alias gates when A == T)
  const A* bias;    // [4H] b_ih + b_hh, or null
  const T* h_prev;  // [n_prev, P] h of the previous step, or null when n_prev == 0
  const T* h0;      // [B, P] initial h of rows b >= n_prev
  A* c_state;       // [B, H] running cell: c_{t-1} in, c_t out
  T* gates;         // [n, 4H] out: activations i, f, g, o
  T* cells;         // [n, H] out: c_t
  T* h_out;         // [n, ld_h] out: o * tanh(c_t) (before any projection)
  int n, n_prev, hidden, proj, ld_h;
};

template <typename T, typename A>
struct BackwardStep {
  const T* w_hr;    // [P, H], or null without projection
  const A* dh;      // [n, P] gradient of this step's h (after projection)
  const T* gates;   // [n, 4H] saved activations
  const T* cells;   // [n, H] saved c_t
  const T* c_prev;  // [n_prev, H] c of the previous step, or null when n_prev == 0
  const T* c0;      // [B, H] initial c of rows b >= n_prev
  A* dc;            // [B, H] running gradient of c: dc_t in, dc_{t-1} out
  A* dgates;        // [n, 4H] out: gradients of the pre-activations
  int n, n_prev, hidden, proj;
};

// One kernel launch each, on `stream`; they check the launch.
template <typename T, typename A>
void forward_step(const ForwardStep<T, A>& p, cudaStream_t stream);

template <typename T, typename A>
void backward_step(const BackwardStep<T, A>& p, cudaStream_t stream);

}  // namespace lstm_fused::cuda
