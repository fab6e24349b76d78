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

namespace lstm_fused::cuda {

// The persistent kernels (persistent.cu): one cooperative launch runs every
// step of a layer. Block b owns hidden units [b*units, (b+1)*units) (all four
// gates) and projection columns [b*proj_units, ...) and keeps its slice of
// the recurrent weights in shared memory for the whole sequence; the blocks
// exchange h (forward) or the gate gradients (backward) through global memory,
// with one grid barrier per step (two with projection). T: float, Half or
// BFloat16; the math runs in float.

// Rows of step t: offsets[t] is the first, offsets[steps + t] the count; null
// offsets: every step has `batch` rows (t * batch the first).
struct StepRows {
  const int* offsets;
  int steps, batch;
};

template <typename T>
struct PersistentForward {
  const T* w_hh;       // [4H, P]
  const T* w_hr;       // [P, H], or null without projection
  const float* xg;     // [N, 4H] x W_ih^T (may alias gates for float)
  const float* bias;   // [4H] b_ih + b_hh, or null
  const T* h0;         // [B, P]
  float* c_state;      // [B, H] c0 in, c_n out
  T* y;                // [N, P] out: h of every step (after projection)
  T* gates;            // [N, 4H] out: activations, or null (inference)
  T* cells;            // [N, H] out: c of every step, or null (inference)
  T* h_pre;            // [B, H] workspace with projection: o * tanh(c) of the step
  StepRows rows;
  int hidden, proj;
  bool reverse;
};

template <typename T>
struct PersistentBackward {
  const T* w_hh;       // [4H, P]
  const T* w_hr;       // [P, H], or null
  const T* gates;      // [N, 4H] saved activations
  const T* cells;      // [N, H] saved c
  const T* c0;         // [B, H]
  float* dh;           // [N, P] in: gradient of each step's h from outside the layer;
                       // the recurrent part is added in place
  float* dh0;          // [B, P] out
  float* dc;           // [B, H] gradient of c_n in, of c0 out
  float* dgates;       // [N, 4H] out: gradients of the pre-activations
  StepRows rows;
  int hidden, proj;
  bool reverse;
};

// The directions one persistent launch runs: a layer's one direction, or
// both directions of a bidirectional layer (count 2: dir[0] forward, dir[1]
// reverse, each on half of the grid).
template <typename Params>
struct Directions {
  Params dir[2];
  int count;
};

// A persistent launch for a layer's sizes, or why there is none.
struct Plan {
  bool persistent = false;
  int directions = 1;  // in the launch; blocks is the whole grid (blocks / directions each)
  int blocks = 0, units = 0, proj_units = 0;
  size_t shared = 0;  // bytes of dynamic shared memory per block
  const char* why = "";
};

// The plan on the current device (its multiprocessors, shared memory and
// the kernels' occupancy) for one direction, or two in one launch.
template <typename T>
Plan plan_forward(int hidden, int proj, int directions);
template <typename T>
Plan plan_backward(int hidden, int proj, int directions);

// One launch running dirs[0 .. plan.directions).
template <typename T>
void persistent_forward(const PersistentForward<T>* dirs, const Plan& plan, cudaStream_t stream);
template <typename T>
void persistent_backward(const PersistentBackward<T>* dirs, const Plan& plan,
                         cudaStream_t stream);

}  // namespace lstm_fused::cuda
