// The fused CPU kernels for processors with AVX-512 (fused_avx512.cpp) or
// AVX2 + FMA (fused_avx2.cpp), the same code (fused_engine.h) for both:
// one parallel region per layer call, in which the threads pack the weights
// into panels, run the input projection of a chunk of steps (about 1 MB of
// gates) as one GEMM, then walk those steps with one barrier per step (two
// with a projection). Each thread owns a fixed
// range of hidden units: per step it computes its units' four gate columns of
// h_{t-1} W_hh^T with a register-tiled microkernel (6 rows by two vectors),
// straight into the gate rows, and applies the cell (lstm_cell.h) to them
// while they are in L1. With AVX-512 the tile holds all four gates of 6 rows
// and one vector of units (gate tiles) and the cell runs on them in registers;
// where the weights fit in cache x_t W_ih^T is in the same tile and there is
// no input projection; where they also fit in L2 and the batch is dense,
// each thread takes a range of batch rows instead of units through all the
// steps, with no barrier. Batch 1 reads W_hh in place (dot products) instead of
// packing it. Backward mirrors it (per step one GEMM gives dh_{t-1} while
// the step's gate gradients are in cache and the next step's saved gates are
// fetched), and after each span of steps (8 MB of gate gradients) dx and the
// weight gradients as GEMMs in the same parallel region, their row blocks
// claimed by whichever thread is free.
//
// The caller allocates every buffer (sizes below); nothing here allocates.
#pragma once

#include <cstdint>

#include "lstm_cpu.h"

namespace lstm_fused::cpu {

// True when this processor can run the fused kernels for T (AVX2 and FMA at
// least, and for double PyTorch's SLEEF exp/tanh). Every function below but
// fused_isa may be called only when it is.
template <typename T>
bool fused_available();

// The instruction set the fused kernels use: "avx512", "avx2", or "generic"
// (none: the BLAS path of lstm_cpu.cpp). The environment variable
// LSTM_FUSED_CPU_ISA=avx2 or =generic (or LSTM_FUSED_CPU_GENERIC=1) picks a
// lower one, read once.
const char* fused_isa();

// Buffer sizes, in elements of T, for a layer call (proj: w_hr given; save:
// forward keeps activations and cells) on at most `threads` threads.
struct FusedSizes {
  int64_t forward;   // forward workspace
  int64_t backward;  // backward workspace
};
template <typename T>
FusedSizes fused_sizes(const LayerDims& d, bool proj, bool save, int threads);

// Forward over the whole sequence. step_offsets[t] is the first row of step
// t. a.cells and a.gates may be null (inference: neither activations nor
// cells are kept, the gates of a chunk of steps live in the workspace). a.c_n
// must hold c0 on entry (the running cell state). y gets h of every step;
// h_n is left to the caller.
template <typename T>
void fused_forward(const LayerDims& d, const int64_t* step_offsets, const ForwardArgs<T>& a,
                   T* work, int threads);

// Backward: the recurrence fills a.dh0, a.dc0, a.db and a.dx (if not null) and,
// with a projection, dh_all [N, P] (dh of every step); the gate gradients of
// a span of steps at a time (in the workspace) go into dW_ih and dW_hh after
// each span. dW_hr is left to the caller.
template <typename T>
void fused_backward(const LayerDims& d, const int64_t* step_offsets, const BackwardArgs<T>& a,
                    T* dh_all, T* work, int threads);

// out[r, :H] = o * tanh(c) of rows [0, N) from the saved activations and cells
// (h before the projection, for dW_hr).
template <typename T>
void fused_hidden(const T* gates, const T* cells, int64_t N, int64_t H, T* out);

// How many threads a layer call is worth (1 for tiny layers), at most `max`.
int fused_threads(const LayerDims& d, int max);

// One instruction set's kernels (the functions above, less the dispatch).
template <typename T>
struct FusedKernels {
  FusedSizes (*sizes)(const LayerDims&, bool proj, bool save, int threads);
  void (*forward)(const LayerDims&, const int64_t*, const ForwardArgs<T>&, T*, int);
  void (*backward)(const LayerDims&, const int64_t*, const BackwardArgs<T>&, T*, T*, int);
  void (*hidden)(const T*, const T*, int64_t, int64_t, T*);
};
namespace avx2 {
template <typename T>
FusedKernels<T> kernels();
bool double_math();  // the SLEEF routines double uses are there
}  // namespace avx2
namespace avx512 {
template <typename T>
FusedKernels<T> kernels();
bool double_math();
}  // namespace avx512

}  // namespace lstm_fused::cpu
