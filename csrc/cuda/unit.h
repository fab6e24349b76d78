// One (batch row, hidden unit) of a step, as both CUDA kernel files apply
// it: the gate values around the cell math of lstm_cell.h, read from and
// written to the [rows, 4H] / [rows, H] layouts. Pointers are at the row's
// first element plus the unit (gate g of the unit is at g * H).
#pragma once

#include "../lstm_cell.h"
#include "platform.h"

namespace lstm_fused::cuda {

// Forward: the four recurrent sums z plus the input projection xg (and the
// bias) through cell_forward; c_state carries c_{t-1} in and c_t out. Writes
// the activations to gates and c_t to cell where they are given; returns h.
// Reads all of xg before writing gates (they may alias).
template <typename T, typename A>
__device__ __forceinline__ A unit_forward(A zi, A zf, A zg, A zo, const A* xg, const A* bias,
                                          int H, A& c_state, T* gates, T* cell) {
  zi += xg[0];
  zf += xg[H];
  zg += xg[2 * H];
  zo += xg[3 * H];
  if (bias != nullptr) {
    zi += bias[0];
    zf += bias[H];
    zg += bias[2 * H];
    zo += bias[3 * H];
  }
  A c, h;
  cell_forward(zi, zf, zg, zo, static_cast<A>(c_state), c, h);
  c_state = c;
  if (gates != nullptr) {
    gates[0] = static_cast<T>(zi);
    gates[H] = static_cast<T>(zf);
    gates[2 * H] = static_cast<T>(zg);
    gates[3 * H] = static_cast<T>(zo);
  }
  if (cell != nullptr) *cell = static_cast<T>(c);
  return h;
}

// Backward: dh (of h before projection) and dc (dc_t in, dc_{t-1} out)
// through cell_backward with the saved activations and cells; the four
// pre-activation gradients to dgates.
template <typename T, typename A>
__device__ __forceinline__ void unit_backward(A dh, const T* gates, T cell, T c_prev, int H,
                                              A& dc, A* dgates) {
  const A i = static_cast<A>(gates[0]), f = static_cast<A>(gates[H]);
  const A g = static_cast<A>(gates[2 * H]), o = static_cast<A>(gates[3 * H]);
  A di, df, dg, dout, dc_prev;
  cell_backward(i, f, g, o, static_cast<A>(cell), static_cast<A>(c_prev), dh,
                static_cast<A>(dc), di, df, dg, dout, dc_prev);
  dc = dc_prev;
  dgates[0] = di;
  dgates[H] = df;
  dgates[2 * H] = dg;
  dgates[3 * H] = dout;
}

}  // namespace lstm_fused::cuda
