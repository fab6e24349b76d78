// CPU layer kernels. On processors with AVX2 + FMA (or AVX-512) the recurrence
// runs in the fused kernels (fused.h); elsewhere (or with
// LSTM_FUSED_CPU_GENERIC=1 / LSTM_FUSED_CPU_ISA=generic) in the
// generic path below: the input projection of all steps is one BLAS GEMM, then
// per step one GEMM adds h_{t-1} W_hh^T into that step's rows of the gate
// buffer and one pass over those rows applies the cell (lstm_cell.h).
// Backward mirrors it; in both paths dx and the weight gradients are GEMMs
// over all steps after the loop.
#include "lstm_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <ATen/Parallel.h>

#include "../lstm_cell.h"
#include "blas.h"
#include "fused.h"

namespace lstm_fused::cpu {

namespace {

// First row of every step in the packed layout.
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

// An uninitialized buffer of n values (a workspace the kernels fill).
template <typename T>
std::unique_ptr<T[]> workspace(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// The fused kernels' workspace of this thread, at least n values, kept for
// its next call (layer calls do not nest): memory the process has just been
// given costs a page fault per 4 KB on first touch (about 3 us under a
// hypervisor, as much as the work on it at some sizes), and glibc maps
// blocks above 32 MB afresh each time. It holds the layer's packed weights
// and a few MB; it grows to the largest layer this thread runs.
template <typename T>
T* scratch(int64_t n) {
  struct Block {
    void* p = nullptr;
    size_t bytes = 0;
    ~Block() { std::free(p); }
  };
  static thread_local Block block;
  const size_t want = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  if (want > block.bytes) {
    std::free(block.p);
    block.p = std::aligned_alloc(64, want);
    block.bytes = block.p ? want : 0;
    if (!block.p) throw std::bad_alloc();
  }
  return static_cast<T*>(block.p);
}

template <typename T>
void copy_rows(T* dst, const T* src, int64_t count) {
  if (count > 0) std::memcpy(dst, src, sizeof(T) * count);
}

// h_n: each row's h at the last step it was active (for the reverse
// direction step 0, where every row is).
template <typename T>
void gather_h_n(const LayerDims& d, const std::vector<int64_t>& off, const T* y, T* h_n) {
  const int64_t P = d.proj;
  if (d.reverse) {
    copy_rows(h_n, y + off[0] * P, d.batch * P);
    return;
  }
  for (int64_t t = 0; t < d.steps; ++t) {
    const int64_t lo = t + 1 < d.steps ? d.batch_sizes[t + 1] : 0, hi = d.batch_sizes[t];
    copy_rows(h_n + lo * P, y + (off[t] + lo) * P, (hi - lo) * P);
  }
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

// One row of the cell, scalar. g: pre-activations in, activations out.
template <typename T>
void cell_row(T* g, int64_t H, T* c, T* c_saved, T* h) {
  for (int64_t j = 0; j < H; ++j) {
    T cn, hn;
    cell_forward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], cn, hn);
    c[j] = cn;
    c_saved[j] = cn;
    h[j] = hn;
  }
}

template <typename T>
void generic_forward(const LayerDims& d, const std::vector<int64_t>& off,
                     const ForwardArgs<T>& a) {
  const int64_t N = d.rows, B = d.batch, I = d.input, H = d.hidden, P = d.proj, G = 4 * H;
  // Inference keeps no activations or cells: they go to scratch buffers.
  std::vector<T> scratch(a.cells ? 0 : N * (G + H));
  T* cells = a.cells ? a.cells : scratch.data();
  T* gates = a.gates ? a.gates : scratch.data() + N * H;

  // gates = x W_ih^T + (b_ih + b_hh), for every step at once.
  const bool has_bias = a.b_ih != nullptr || a.b_hh != nullptr;
  if (has_bias) {
    std::vector<T> bias(G);
    for (int64_t j = 0; j < G; ++j)
      bias[j] = (a.b_ih ? a.b_ih[j] : T(0)) + (a.b_hh ? a.b_hh[j] : T(0));
    for (int64_t r = 0; r < N; ++r) copy_rows(gates + r * G, bias.data(), G);
  }
  gemm<T>(false, true, N, G, I, T(1), a.x, I, a.w_ih, I, has_bias ? T(1) : T(0), gates, G);

  // h of the previous step: y's rows or h0 (rows that start at this step).
  std::vector<T> h_prev(B * P);
  std::vector<T> h_pre(a.w_hr ? B * H : 0);  // o*tanh(c) before projection
  for (int64_t k = 0; k < d.steps; ++k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    const int64_t tp = k > 0 ? step_at(d, k - 1) : -1;
    const int64_t n_prev = tp >= 0 ? std::min(n, d.batch_sizes[tp]) : 0;
    copy_rows(h_prev.data(), a.y + (tp >= 0 ? off[tp] : 0) * P, n_prev * P);
    copy_rows(h_prev.data() + n_prev * P, a.h0 + n_prev * P, (n - n_prev) * P);
    T* g = gates + r0 * G;
    gemm<T>(false, true, n, G, P, T(1), h_prev.data(), P, a.w_hh, P, T(1), g, G);
    T* h_out = a.w_hr ? h_pre.data() : a.y + r0 * P;
    for_rows(n, H, [&](int64_t b) {
      cell_row(g + b * G, H, a.c_n + b * H, cells + (r0 + b) * H, h_out + b * H);
    });
    if (a.w_hr)
      gemm<T>(false, true, n, P, H, T(1), h_pre.data(), H, a.w_hr, H, T(0), a.y + r0 * P, P);
  }
}

// The backward recurrence of the generic path: fills dgates, dh0, dc0 and,
// with a projection, dh_all.
template <typename T>
void generic_backward(const LayerDims& d, const std::vector<int64_t>& off,
                      const BackwardArgs<T>& a, T* dgates, T* dh_all) {
  const int64_t B = d.batch, H = d.hidden, P = d.proj, G = 4 * H;
  // dh0 and dc0 carry the running gradients of h and c.
  T* dh = a.dh0;
  T* dc = a.dc0;
  if (a.dh_n) copy_rows(dh, a.dh_n, B * P); else std::fill(dh, dh + B * P, T(0));
  if (a.dc_n) copy_rows(dc, a.dc_n, B * H); else std::fill(dc, dc + B * H, T(0));
  std::vector<T> dh_pre(a.w_hr ? B * H : 0);  // dh before projection

  for (int64_t k = d.steps - 1; k >= 0; --k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    const int64_t tp = k > 0 ? step_at(d, k - 1) : -1;
    const int64_t n_prev = tp >= 0 ? d.batch_sizes[tp] : 0;
    const T* c_prev_rows = tp >= 0 ? a.cells + off[tp] * H : nullptr;
    if (a.dy) {
      const T* dy = a.dy + r0 * P;
      for (int64_t e = 0; e < n * P; ++e) dh[e] += dy[e];
    }
    const T* dhv = dh;
    if (a.w_hr) {
      copy_rows(dh_all + r0 * P, dh, n * P);
      gemm<T>(false, false, n, H, P, T(1), dh, P, a.w_hr, H, T(0), dh_pre.data(), H);
      dhv = dh_pre.data();
    }
    T* dg = dgates + r0 * G;
    for_rows(n, H, [&](int64_t b) {
      const T* g = a.gates + (r0 + b) * G;
      const T* c = a.cells + (r0 + b) * H;
      const T* cp = b < n_prev ? c_prev_rows + b * H : a.c0 + b * H;
      T* out = dg + b * G;
      T* dcb = dc + b * H;
      for (int64_t j = 0; j < H; ++j)
        cell_backward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], cp[j],
                      dhv[b * H + j], dcb[j], out[j], out[H + j], out[2 * H + j],
                      out[3 * H + j], dcb[j]);
    });
    // dh_{t-1} = dgates_t W_hh for the active rows.
    gemm<T>(false, false, n, P, G, T(1), dg, G, a.w_hh, P, T(0), dh, P);
  }
}

// After the generic recurrence: dx, dW_ih, dW_hh and db as GEMMs over all
// steps.
template <typename T>
void generic_gradients(const LayerDims& d, const std::vector<int64_t>& off,
                       const BackwardArgs<T>& a, const T* dgates) {
  const int64_t N = d.rows, B = d.batch, I = d.input, P = d.proj, G = 4 * d.hidden;
  if (a.dx != nullptr) gemm<T>(false, false, N, I, G, T(1), dgates, G, a.w_ih, I, T(0), a.dx, I);
  gemm<T>(true, false, G, I, N, T(1), dgates, G, a.x, I, T(0), a.dw_ih, I);

  // dW_hh = sum over rows of dgates^T h_{t-1}. With every step B rows, the
  // h_{t-1} of all steps but the first are y shifted by one step: two GEMMs.
  const bool uniform = d.batch_sizes[d.steps - 1] == B;
  if (uniform) {
    const int64_t first = d.reverse ? N - B : 0;  // the rows whose h_{t-1} is h0
    gemm<T>(true, false, G, P, B, T(1), dgates + first * G, G, a.h0, P, T(0), a.dw_hh, P);
    if (N > B) {
      const T* dg = dgates + (d.reverse ? 0 : B) * G;
      const T* hp = a.y + (d.reverse ? B : 0) * P;
      gemm<T>(true, false, G, P, N - B, T(1), dg, G, hp, P, T(1), a.dw_hh, P);
    }
  } else {
    std::vector<T> h_prev(N * P);
    for (int64_t k = 0; k < d.steps; ++k) {
      const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
      const int64_t tp = k > 0 ? step_at(d, k - 1) : -1;
      const int64_t n_prev = tp >= 0 ? std::min(n, d.batch_sizes[tp]) : 0;
      if (n_prev > 0) copy_rows(h_prev.data() + r0 * P, a.y + off[tp] * P, n_prev * P);
      copy_rows(h_prev.data() + (r0 + n_prev) * P, a.h0 + n_prev * P, (n - n_prev) * P);
    }
    gemm<T>(true, false, G, P, N, T(1), dgates, G, h_prev.data(), P, T(0), a.dw_hh, P);
  }

  if (a.db) {
    std::fill(a.db, a.db + G, T(0));
    for (int64_t r = 0; r < N; ++r) {
      const T* dg = dgates + r * G;
      for (int64_t j = 0; j < G; ++j) a.db[j] += dg[j];
    }
  }
}

// dW_hr = sum over rows of dh^T h', h' (before the projection) recomputed
// from the saved activations and cells.
template <typename T>
void projection_gradient(const LayerDims& d, const BackwardArgs<T>& a, const T* dh_all) {
  const int64_t N = d.rows, H = d.hidden, P = d.proj, G = 4 * H;
  const auto h_pre = workspace<T>(N * H);
  if (fused_available<T>()) {
    fused_hidden(a.gates, a.cells, N, H, h_pre.get());
  } else {
    for_rows(N, H, [&](int64_t r) {
      for (int64_t j = 0; j < H; ++j)
        h_pre[r * H + j] = cell_hidden(a.gates[r * G + 3 * H + j], a.cells[r * H + j]);
    });
  }
  gemm<T>(true, false, P, H, N, T(1), dh_all, P, h_pre.get(), H, T(0), a.dw_hr, H);
}

}  // namespace

template <typename T>
void layer_forward(const LayerDims& d, const ForwardArgs<T>& a) {
  const std::vector<int64_t> off = step_offsets(d);
  copy_rows(a.c_n, a.c0, d.batch * d.hidden);  // the running cell state
  if (fused_available<T>()) {
    const int threads = fused_threads(d, at::get_num_threads());
    T* work = scratch<T>(fused_sizes<T>(d, a.w_hr != nullptr, a.cells != nullptr, threads).forward);
    fused_forward(d, off.data(), a, work, threads);
  } else {
    generic_forward(d, off, a);
  }
  gather_h_n(d, off, a.y, a.h_n);
}

template <typename T>
void layer_backward(const LayerDims& d, const BackwardArgs<T>& a) {
  const std::vector<int64_t> off = step_offsets(d);
  // dh of every step (for dW_hr); the recurrence writes every row.
  const auto dh_all = workspace<T>(a.w_hr ? d.rows * d.proj : 0);
  if (fused_available<T>()) {
    const int threads = fused_threads(d, at::get_num_threads());
    T* work = scratch<T>(fused_sizes<T>(d, a.w_hr != nullptr, true, threads).backward);
    fused_backward(d, off.data(), a, dh_all.get(), work, threads);
  } else {
    // The gate gradients of every step.
    const auto dgates = workspace<T>(d.rows * 4 * d.hidden);
    generic_backward(d, off, a, dgates.get(), dh_all.get());
    generic_gradients(d, off, a, dgates.get());
  }
  if (a.w_hr) projection_gradient(d, a, dh_all.get());
}

template void layer_forward<float>(const LayerDims&, const ForwardArgs<float>&);
template void layer_forward<double>(const LayerDims&, const ForwardArgs<double>&);
template void layer_backward<float>(const LayerDims&, const BackwardArgs<float>&);
template void layer_backward<double>(const LayerDims&, const BackwardArgs<double>&);

}  // namespace lstm_fused::cpu
