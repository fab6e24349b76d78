// Row kernels of the CPU path: the cell (lstm_cell.h) applied to one row of
// one step. A scalar version always exists; a SIMD version (AVX2 + FMA, with
// the vector exp/tanh PyTorch's CPU library ships) is chosen at load time
// when the processor and library have it.
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

template <typename T>
struct CellRows {
  // g [4H]: pre-activations in, activations out. c [H]: previous cell in,
  // new cell out; c_saved [H] gets it too. h [H]: o*tanh(c).
  void (*forward)(T* g, T* c, T* c_saved, T* h, int64_t H);
  // g [4H] activations, c [H], c_prev [H], dh [H]; dc [H]: gradient of c in,
  // of c_prev out; dg [4H] out: gradients of the pre-activations.
  void (*backward)(const T* g, const T* c, const T* c_prev, const T* dh, T* dc,
                   T* dg, int64_t H);
  // h [H] = o*tanh(c), o taken from the activations g [4H].
  void (*hidden)(const T* g, const T* c, T* h, int64_t H);
  const char* isa;
};

template <typename T>
const CellRows<T>& cell_rows();

// Filled by the AVX2 translation unit; false when this machine cannot run it.
bool avx2_cell_rows(CellRows<float>* f, CellRows<double>* d);

}  // namespace lstm_fused::cpu
