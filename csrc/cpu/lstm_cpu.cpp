// CPU kernels: the input projection of all steps is one GEMM, then per step
// one GEMM adds h_{t-1} W_hh^T straight into that step's rows of the gate
// buffer and one pass over those rows applies the cell (lstm_cell.h) while
// they are still in cache. Backward mirrors it; the weight gradients and dx
// are GEMMs over all steps after the loop.
#include "lstm_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "blas.h"
#include "cell_rows.h"

namespace lstm_fused::cpu {
namespace {

// Row offset of every step in the packed layout.
std::vector<int64_t> step_offsets(const LayerDims& d) {
  std::vector<int64_t> off(d.steps);
  int64_t r = 0;
  for (int64_t t = 0; t < d.steps; ++t) {
    off[t] = r;
    r += d.batch_sizes[t];
  }
  return off;
}

// The k-th step in processing order.
inline int64_t step_at(const LayerDims& d, int64_t k) {
  return d.reverse ? d.steps - 1 - k : k;
}

template <typename T>
void copy_rows(T* dst, const T* src, int64_t count) {
  if (count > 0) std::memcpy(dst, src, sizeof(T) * count);
}

// Runs fn(b) for the rows b in [0, n), split across threads only when a
// step has enough cells to pay for it.
template <typename F>
void for_rows(int64_t n, int64_t width, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b);
  });
}

}  // namespace

template <typename T>
void layer_forward(const LayerDims& d, const ForwardArgs<T>& a) {
  const int64_t N = d.rows, B = d.batch, I = d.input, H = d.hidden,
                P = d.proj, G = 4 * H;
  const std::vector<int64_t> off = step_offsets(d);

  // gates = x W_ih^T + (b_ih + b_hh), for every step at once.
  T beta = T(0);
  if (a.b_ih != nullptr || a.b_hh != nullptr) {
    std::vector<T> bias(G, T(0));
    for (int64_t j = 0; j < G; ++j)
      bias[j] = (a.b_ih ? a.b_ih[j] : T(0)) + (a.b_hh ? a.b_hh[j] : T(0));
    for (int64_t r = 0; r < N; ++r) copy_rows(a.gates + r * G, bias.data(), G);
    beta = T(1);
  }
  gemm<T>(false, true, N, G, I, T(1), a.x, I, a.w_ih, I, beta, a.gates, G);

  // h_n and c_n hold the running state; rows that are not active at a step
  // keep theirs, so at the end each row holds its last state.
  copy_rows(a.h_n, a.h0, B * P);
  copy_rows(a.c_n, a.c0, B * H);
  std::vector<T> h_pre(a.w_hr ? B * H : 0);  // o*tanh(c) before projection

  const CellRows<T>& cell = cell_rows<T>();
  for (int64_t k = 0; k < d.steps; ++k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    T* g = a.gates + r0 * G;
    gemm<T>(false, true, n, G, P, T(1), a.h_n, P, a.w_hh, P, T(1), g, G);
    for_rows(n, H, [&](int64_t b) {
      T* h_out = a.w_hr ? h_pre.data() + b * H : a.h_n + b * P;
      cell.forward(g + b * G, a.c_n + b * H, a.cells + (r0 + b) * H, h_out, H);
    });
    if (a.w_hr)
      gemm<T>(false, true, n, P, H, T(1), h_pre.data(), H, a.w_hr, H, T(0),
              a.h_n, P);
    copy_rows(a.y + r0 * P, a.h_n, n * P);
  }
}

template <typename T>
void layer_backward(const LayerDims& d, const BackwardArgs<T>& a) {
  const int64_t N = d.rows, B = d.batch, I = d.input, H = d.hidden,
                P = d.proj, G = 4 * H;
  const std::vector<int64_t> off = step_offsets(d);

  // dh0 and dc0 carry the running gradients of h and c.
  T* dh = a.dh0;
  T* dc = a.dc0;
  if (a.dh_n) copy_rows(dh, a.dh_n, B * P); else std::fill(dh, dh + B * P, T(0));
  if (a.dc_n) copy_rows(dc, a.dc_n, B * H); else std::fill(dc, dc + B * H, T(0));

  const CellRows<T>& cell = cell_rows<T>();
  std::vector<T> dgates(N * G);
  std::vector<T> dh_all(a.w_hr ? N * P : 0);  // dh of every step (for dW_hr)
  std::vector<T> dh_pre(a.w_hr ? B * H : 0);  // dh before projection

  for (int64_t k = d.steps - 1; k >= 0; --k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    // The step before this one in processing order, if any.
    const int64_t tp = k > 0 ? step_at(d, k - 1) : -1;
    const int64_t n_prev = tp >= 0 ? d.batch_sizes[tp] : 0;
    const T* c_prev_rows = tp >= 0 ? a.cells + off[tp] * H : nullptr;

    if (a.dy) {
      const T* dy = a.dy + r0 * P;
      for (int64_t e = 0; e < n * P; ++e) dh[e] += dy[e];
    }
    const T* dhv = dh;
    if (a.w_hr) {
      copy_rows(dh_all.data() + r0 * P, dh, n * P);
      gemm<T>(false, false, n, H, P, T(1), dh, P, a.w_hr, H, T(0),
              dh_pre.data(), H);
      dhv = dh_pre.data();
    }
    T* dg = dgates.data() + r0 * G;
    for_rows(n, H, [&](int64_t b) {
      const T* cp = b < n_prev ? c_prev_rows + b * H : a.c0 + b * H;
      cell.backward(a.gates + (r0 + b) * G, a.cells + (r0 + b) * H, cp, dhv + b * H,
                    dc + b * H, dg + b * G, H);
    });
    // dh_{t-1} = dgates_t W_hh for the active rows.
    gemm<T>(false, false, n, P, G, T(1), dg, G, a.w_hh, P, T(0), dh, P);
  }

  // Gradients over all steps at once.
  gemm<T>(false, false, N, I, G, T(1), dgates.data(), G, a.w_ih, I, T(0), a.dx, I);
  gemm<T>(true, false, G, I, N, T(1), dgates.data(), G, a.x, I, T(0), a.dw_ih, I);

  // h_{t-1} of every row of every step: y of the previous step or h0.
  std::vector<T> h_prev(N * P);
  for (int64_t k = 0; k < d.steps; ++k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    const int64_t tp = k > 0 ? step_at(d, k - 1) : -1;
    const int64_t n_prev = tp >= 0 ? std::min(n, d.batch_sizes[tp]) : 0;
    if (n_prev > 0) copy_rows(h_prev.data() + r0 * P, a.y + off[tp] * P, n_prev * P);
    copy_rows(h_prev.data() + (r0 + n_prev) * P, a.h0 + n_prev * P, (n - n_prev) * P);
  }
  gemm<T>(true, false, G, P, N, T(1), dgates.data(), G, h_prev.data(), P, T(0),
          a.dw_hh, P);

  if (a.db) {
    std::fill(a.db, a.db + G, T(0));
    for (int64_t r = 0; r < N; ++r) {
      const T* dg = dgates.data() + r * G;
      for (int64_t j = 0; j < G; ++j) a.db[j] += dg[j];
    }
  }
  if (a.w_hr) {
    std::vector<T> h_pre(N * H);
    for_rows(N, H, [&](int64_t r) {
      cell.hidden(a.gates + r * G, a.cells + r * H, h_pre.data() + r * H, H);
    });
    gemm<T>(true, false, P, H, N, T(1), dh_all.data(), P, h_pre.data(), H, T(0),
            a.dw_hr, H);
  }
}

template void layer_forward<float>(const LayerDims&, const ForwardArgs<float>&);
template void layer_forward<double>(const LayerDims&, const ForwardArgs<double>&);
template void layer_backward<float>(const LayerDims&, const BackwardArgs<float>&);
template void layer_backward<double>(const LayerDims&, const BackwardArgs<double>&);

}  // namespace lstm_fused::cpu
