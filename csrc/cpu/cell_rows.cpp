#include "cell_rows.h"

#include "../lstm_cell.h"

namespace lstm_fused::cpu {
namespace {

template <typename T>
void forward_scalar(T* g, int64_t H, T* c, T* c_saved, T* h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    T cn, hn;
    cell_forward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], cn, hn);
    c[j] = cn;
    c_saved[j] = cn;
    h[j] = hn;
  }
}

template <typename T>
void backward_scalar(const T* g, int64_t H, const T* c, const T* c_prev, const T* dh,
                     T* dc, T* dg, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    cell_backward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], c_prev[j], dh[j],
                  dc[j], dg[j], dg[H + j], dg[2 * H + j], dg[3 * H + j], dc[j]);
}

template <typename T>
void hidden_scalar(const T* g, int64_t H, const T* c, T* h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) h[j] = cell_hidden(g[3 * H + j], c[j]);
}

template <typename T>
CellRows<T> scalar_rows() {
  return {&forward_scalar<T>, &backward_scalar<T>, &hidden_scalar<T>, "scalar"};
}

struct Table {
  CellRows<float> f = scalar_rows<float>();
  CellRows<double> d = scalar_rows<double>();
  Table() { avx2_cell_rows(&f, &d); }
};

const Table& table() {
  static const Table t;
  return t;
}

}  // namespace

template <>
const CellRows<float>& cell_rows<float>() { return table().f; }
template <>
const CellRows<double>& cell_rows<double>() { return table().d; }

}  // namespace lstm_fused::cpu
