// CPU kernels: the input projection of all steps is one GEMM, then per step
// one GEMM adds h_{t-1} W_hh^T straight into that step's rows of the gate
// buffer and one pass over those rows applies the cell (lstm_cell.h) while
// they are still in cache. Backward mirrors it; the weight gradients and dx
// are GEMMs over all steps after the loop.
#include "lstm_cpu.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
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

// The tiled path (float with brgemm) copies W^T once per call, so it is
// taken when enough steps share that copy.
template <typename T>
bool use_tiled(const LayerDims& d) {
  return std::is_same_v<T, float> && have_brgemm() && d.steps >= 4;
}

// Hidden units per block of the fused recurrent step.
constexpr int64_t kUnits = 32;

// A gate weight w [4H, K] as column panels of w^T for brgemm: panel (blk, q)
// is [K, u] row-major, u = the units of block blk, holding the rows
// q*H + blk*kUnits .. + u of w. Each panel is read contiguously.
template <typename T>
struct GatePanels {
  std::vector<T> data;
  int64_t K, H;
  GatePanels(const T* w, int64_t H_, int64_t K_) : data(4 * H_ * K_), K(K_), H(H_) {
    for (int64_t j0 = 0; j0 < H; j0 += kUnits) {
      const int64_t u = std::min(kUnits, H - j0);
      for (int64_t q = 0; q < 4; ++q) {
        T* p = panel(j0, q);
        for (int64_t c = 0; c < u; ++c) {
          const T* row = w + (q * H + j0 + c) * K;
          for (int64_t k = 0; k < K; ++k) p[k * u + c] = row[k];
        }
      }
    }
  }
  // Panel of gate q for the block starting at unit j0; its leading dim is u.
  const T* panel(int64_t j0, int64_t q) const { return data.data() + (4 * j0 + q * width(j0)) * K; }
  T* panel(int64_t j0, int64_t q) { return data.data() + (4 * j0 + q * width(j0)) * K; }
  int64_t width(int64_t j0) const { return std::min(kUnits, H - j0); }
};

// gates[rows, 4H] (+)= a[rows, K] w^T through the panels, tiled across threads.
inline void gate_gemm(int64_t rows, const float* a, const GatePanels<float>& w, float* gates,
                      bool add) {
  const int64_t K = w.K, H = w.H, G = 4 * H, mb = 128;
  const int64_t tm = (rows + mb - 1) / mb, tn = (H + kUnits - 1) / kUnits;
  at::parallel_for(0, tm * tn, 1, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t m0 = (t / tn) * mb, j0 = (t % tn) * kUnits, u = w.width(j0);
      for (int64_t q = 0; q < 4; ++q)
        brgemm(std::min(mb, rows - m0), u, K, a + m0 * K, K, w.panel(j0, q), u,
               gates + m0 * G + q * H + j0, G, add);
    }
    brgemm_done();
  });
}

}  // namespace

template <typename T>
void layer_forward(const LayerDims& d, const ForwardArgs<T>& a) {
  const int64_t N = d.rows, B = d.batch, I = d.input, H = d.hidden,
                P = d.proj, G = 4 * H;
  const std::vector<int64_t> off = step_offsets(d);
  const CellRows<T>& cell = cell_rows<T>();
  const bool tiled = use_tiled<T>(d);

  // gates = x W_ih^T + (b_ih + b_hh), for every step at once.
  const bool has_bias = a.b_ih != nullptr || a.b_hh != nullptr;
  if (has_bias) {
    std::vector<T> bias(G, T(0));
    for (int64_t j = 0; j < G; ++j)
      bias[j] = (a.b_ih ? a.b_ih[j] : T(0)) + (a.b_hh ? a.b_hh[j] : T(0));
    for (int64_t r = 0; r < N; ++r) copy_rows(a.gates + r * G, bias.data(), G);
  }
  std::optional<GatePanels<T>> w_hh_panels;
  if constexpr (std::is_same_v<T, float>) {
    if (tiled) {
      gate_gemm(N, a.x, GatePanels<T>(a.w_ih, H, I), a.gates, has_bias);
      w_hh_panels.emplace(a.w_hh, H, P);
    }
  }
  if (!tiled)
    gemm<T>(false, true, N, G, I, T(1), a.x, I, a.w_ih, I, has_bias ? T(1) : T(0),
            a.gates, G);
  std::vector<T> w_hr_t(tiled && a.w_hr ? H * P : 0);
  if (!w_hr_t.empty()) transpose(a.w_hr, P, H, w_hr_t.data());

  // h of the previous step (cur) and of this one (nxt); rows that are not
  // active keep their state in both. c_n holds the running cell state.
  std::vector<T> h_buf(2 * B * P);
  T* cur = h_buf.data();
  T* nxt = cur + B * P;
  copy_rows(cur, a.h0, B * P);
  copy_rows(nxt, a.h0, B * P);
  copy_rows(a.c_n, a.c0, B * H);
  std::vector<T> h_pre(a.w_hr ? B * H : 0);  // o*tanh(c) before projection
  auto h_out = [&](int64_t b) { return a.w_hr ? h_pre.data() + b * H : nxt + b * P; };

  int64_t n_prev = B;
  for (int64_t k = 0; k < d.steps; ++k) {
    const int64_t t = step_at(d, k), n = d.batch_sizes[t], r0 = off[t];
    T* g = a.gates + r0 * G;
    if constexpr (std::is_same_v<T, float>) {
      if (tiled) {
        // Per block of hidden units: its four gate columns of h_{t-1} W_hh^T
        // added into the gate rows, then the cell on them while in cache.
        const int64_t blocks = (H + kUnits - 1) / kUnits;
        at::parallel_for(0, blocks, 1, [&](int64_t s, int64_t e) {
          for (int64_t blk = s; blk < e; ++blk) {
            const int64_t j0 = blk * kUnits, u = std::min(kUnits, H - j0);
            for (int64_t q = 0; q < 4; ++q)
              brgemm(n, u, P, cur, P, w_hh_panels->panel(j0, q), u, g + q * H + j0, G, true);
            for (int64_t b = 0; b < n; ++b)
              cell.forward(g + b * G + j0, H, a.c_n + b * H + j0,
                           a.cells + (r0 + b) * H + j0, h_out(b) + j0, u);
          }
          brgemm_done();
        });
      }
    }
    if (!tiled) {
      gemm<T>(false, true, n, G, P, T(1), cur, P, a.w_hh, P, T(1), g, G);
      for_rows(n, H, [&](int64_t b) {
        cell.forward(g + b * G, H, a.c_n + b * H, a.cells + (r0 + b) * H, h_out(b), H);
      });
    }
    if (a.w_hr) {
      if (tiled)
        gemm_nn<T>(n, P, H, h_pre.data(), H, w_hr_t.data(), P, nxt, P, false);
      else
        gemm<T>(false, true, n, P, H, T(1), h_pre.data(), H, a.w_hr, H, T(0), nxt, P);
    }
    copy_rows(a.y + r0 * P, nxt, n * P);
    // Rows that just finished keep their last h in both buffers.
    if (n < n_prev) copy_rows(nxt + n * P, cur + n * P, (n_prev - n) * P);
    std::swap(cur, nxt);
    n_prev = n;
  }
  copy_rows(a.h_n, cur, B * P);
}

template <typename T>
void layer_backward(const LayerDims& d, const BackwardArgs<T>& a) {
  const int64_t N = d.rows, B = d.batch, I = d.input, H = d.hidden,
                P = d.proj, G = 4 * H;
  const std::vector<int64_t> off = step_offsets(d);
  const CellRows<T>& cell = cell_rows<T>();

  // dh0 and dc0 carry the running gradients of h and c.
  T* dh = a.dh0;
  T* dc = a.dc0;
  if (a.dh_n) copy_rows(dh, a.dh_n, B * P); else std::fill(dh, dh + B * P, T(0));
  if (a.dc_n) copy_rows(dc, a.dc_n, B * H); else std::fill(dc, dc + B * H, T(0));

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
      gemm_nn<T>(n, H, P, dh, P, a.w_hr, H, dh_pre.data(), H, false);
      dhv = dh_pre.data();
    }
    T* dg = dgates.data() + r0 * G;
    for_rows(n, H, [&](int64_t b) {
      const T* cp = b < n_prev ? c_prev_rows + b * H : a.c0 + b * H;
      cell.backward(a.gates + (r0 + b) * G, H, a.cells + (r0 + b) * H, cp, dhv + b * H,
                    dc + b * H, dg + b * G, H);
    });
    // dh_{t-1} = dgates_t W_hh for the active rows.
    gemm_nn<T>(n, P, G, dg, G, a.w_hh, P, dh, P, false);
  }

  // Gradients over all steps at once.
  gemm_nn<T>(N, I, G, dgates.data(), G, a.w_ih, I, a.dx, I, false);
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
      cell.hidden(a.gates + r * G, H, a.cells + r * H, h_pre.data() + r * H, H);
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
