// Row kernels of the CPU path: the cell (lstm_cell.h) applied to one row of
// one step. A scalar version always exists; a SIMD version (AVX2 + FMA, with
// the vector exp/tanh PyTorch's CPU library ships) is chosen at load time
// when the processor and library have it.
#pragma once

#include <cstdint>

namespace lstm_fused::cpu {

// Each handles n hidden units of one row; gate q of unit j is g[q*stride + j]
// (stride = H for a whole row; a block of units passes a pointer into it).
template <typename T>
struct CellRows {
  // g: pre-activations in, activations out. c [n]: previous cell in, new cell
  // out; c_saved [n] gets it too. h [n]: o*tanh(c).
  void (*forward)(T* g, int64_t stride, T* c, T* c_saved, T* h, int64_t n);
  // g: activations; c, c_prev, dh [n]; dc [n]: gradient of c in, of c_prev
  // out; dg (laid out like g) out: gradients of the pre-activations.
  void (*backward)(const T* g, int64_t stride, const T* c, const T* c_prev,
                   const T* dh, T* dc, T* dg, int64_t n);
  // h [n] = o*tanh(c), o taken from the activations g.
  void (*hidden)(const T* g, int64_t stride, const T* c, T* h, int64_t n);
  const char* isa;
};

template <typename T>
const CellRows<T>& cell_rows();

// Filled by the AVX2 translation unit; false when this machine cannot run it.
bool avx2_cell_rows(CellRows<float>* f, CellRows<double>* d);

}  // namespace lstm_fused::cpu
