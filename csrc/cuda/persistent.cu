// The persistent kernels of one LSTM layer: every step in one cooperative
// launch (see lstm_cuda.h). Per step, forward:
//   1. each block: z = h_{t-1} W_hh^T for its units' four gates (its slice of
//      W_hh in shared memory), + x W_ih^T + bias, cell_forward (lstm_cell.h);
//      h_t of its units to y (or, with projection, to h_pre)
//   2. grid barrier
//   3. with projection: each block y_t = h_pre W_hr^T for its columns (its
//      slice of W_hr in shared memory); grid barrier
// Backward, steps in reverse:
//   1. each block, for its units: dh' = dh_t (with projection dh_t W_hr),
//      cell_backward, the gate gradients of its units to dgates
//   2. grid barrier
//   3. each block: dh_{t-1} += dG_t W_hh for its columns (its slice of W_hh
//      in shared memory), or dh0 for rows that start at t; with projection a
//      grid barrier (every block's dh' needs every column), else a block
//      barrier (without projection a block's columns are its units).
// A bidirectional layer runs both directions in one launch: the first half
// of the grid the forward direction, the second the reverse one, each as
// above on its own weights and outputs; the grid barriers are shared (both
// directions take the same number of steps).
// The products of the half types run on tensor cores (wmma, float
// accumulation; see kTensorCores), the others on CUDA cores in float; every
// sum has a fixed order, so results are deterministic.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "lstm_cuda.h"
#include "unit.h"

namespace lstm_fused::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;  // per block
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;       // batch rows per product tile on CUDA cores
constexpr int kTile = 16;      // on tensor cores: the m (and n, k) of m16n16k16
constexpr int kChunk = 128;    // reduction (k) values staged per pass
constexpr int kMinUnits = 8;   // hidden units per block, at least

// Which products run on tensor cores (float accumulation): the forward ones
// of both half types; the backward ones of bfloat16, whose float gradients
// enter as two bfloat16 parts (hi + lo: about 16 bits of mantissa, the
// exponent range of float). float16 cannot hold small gradients (its
// smallest value is 6e-8): its backward, and all of float32, run on CUDA
// cores in float.
template <typename T>
constexpr bool kTensorCores = !std::is_same_v<T, float>;
template <typename T>
constexpr bool kTensorCoresBackward = std::is_same_v<T, c10::BFloat16>;

template <typename T>
struct WmmaType;  // the CUDA type of a c10 half type
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Loads of what other blocks wrote during the launch: past L1 (.cg), which
// is not coherent across multiprocessors.
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float load_cg(const c10::Half* p) {
  return __half2float(__ldcg(reinterpret_cast<const __half*>(p)));
}
__device__ __forceinline__ float load_cg(const c10::BFloat16* p) {
  return __bfloat162float(__ldcg(reinterpret_cast<const __nv_bfloat16*>(p)));
}

__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }
__host__ __device__ constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }
__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr size_t smax(size_t a, size_t b) { return a > b ? a : b; }

// A weight slice in shared memory for `cols` output columns and a reduction
// of `k` values. On CUDA cores [k4][cols] (k4 = k rounded up to 4, the
// padding zero); on tensor cores [round16(cols)][ld] with ld = round16(k) + 8
// (the padding zero; +8: rows in different banks), wmma's column-major b.
struct Slice {
  int cols, k, ld, rows;
  bool mma;
  __host__ __device__ Slice(int c, int kk, bool m) : cols(c), k(kk), mma(m) {
    ld = m ? round_up(kk, kTile) + 8 : c;
    rows = m ? round_up(c, kTile) : round_up(kk, 4);
  }
  __host__ __device__ size_t bytes(size_t t_size) const { return t_size * rows * ld; }
  // Index of weight (column c, reduction index kk).
  __device__ int at(int c, int kk) const { return mma ? c * ld + kk : kk * ld + c; }
};

// Dynamic shared memory of a block: two weight slices (storage type T; the
// second empty without projection) and the scratch of the products, sized
// for both kinds of product.
struct Shared {
  size_t w, wr, stage, part, out, total;
  __host__ __device__ Shared(size_t t_size, const Slice& a, const Slice& b, int cols) {
    w = 0;
    wr = align16(a.bytes(t_size));
    stage = align16(wr + b.bytes(t_size));
    part = align16(stage + smax(sizeof(float) * kRows * kChunk,
                                2 * t_size * kTile * (kChunk + 8)));
    out = align16(part + smax(sizeof(float) * kRows * kThreads,
                              sizeof(float) * 2 * kWarps * kTile * kTile));
    total = align16(out + sizeof(float) * kTile * round_up(cols, kTile));
  }
};

// The two kernels' slices for u units and up projection columns per block:
// forward W_hh (4u gate columns over P) and W_hr (up columns over H);
// backward W_hh^T (up columns over 4H) and W_hr^T (u columns over P).
struct ForwardSlices {
  Slice w, wr;
  __host__ __device__ ForwardSlices(int H, int P, int u, int up, bool proj, bool mma)
      : w(4 * u, P, mma), wr(proj ? up : 0, proj ? H : 0, mma) {}
};
struct BackwardSlices {
  Slice w, wr;
  __host__ __device__ BackwardSlices(int H, int P, int u, int up, bool proj, bool mma)
      : w(up, 4 * H, mma), wr(proj ? u : 0, proj ? P : 0, mma) {}
};

__host__ __device__ inline Shared forward_shared(size_t t_size, int H, int P, int u, int up,
                                                 bool proj, bool mma) {
  const ForwardSlices s(H, P, u, up, proj, mma);
  return Shared(t_size, s.w, s.wr, 4 * u > up ? 4 * u : up);
}
__host__ __device__ inline Shared backward_shared(size_t t_size, int H, int P, int u, int up,
                                                  bool proj, bool mma) {
  const BackwardSlices s(H, P, u, up, proj, mma);
  return Shared(t_size, s.w, s.wr, up > u ? up : u);
}

// Fills `slice` in shared memory: weight(c, k) for c < cols, k < K; zero
// in the padding.
template <typename T, typename Weight>
__device__ void load_slice(T* smem, const Slice& slice, const Weight& weight) {
  const int total = slice.rows * slice.ld;
  for (int e = threadIdx.x; e < total; e += kThreads) {
    const int c = slice.mma ? e / slice.ld : e % slice.ld;
    const int k = slice.mma ? e % slice.ld : e / slice.ld;
    smem[e] = c < slice.cols && k < slice.k ? weight(c, k) : T(0);
  }
}

// The products. out[r][n] = sum_k in(r, k) w(n, k) for rows r < `rows` of a
// tile, columns n < N (<= kThreads), w a slice in shared memory. Each ends
// at a barrier: `out` is complete, the scratch free. Every sum has a fixed
// order.

// On CUDA cores: the k of each staged chunk are split into kThreads / N
// contiguous ranges, one per group of threads (a thread: one column, every
// row of the tile, four k at a time); the groups' partial sums are added in
// group order.
template <typename W, typename In>
__device__ void fma_product(const In& in, int rows, int K, const W* w, const Slice& slice,
                            float* stage, float* part, float* out) {
  const int N = slice.cols, tid = threadIdx.x, groups = kThreads / N, n = tid % N, g = tid / N;
  const int span = round_up((kChunk + groups - 1) / groups, 4);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int kc = imin(kChunk, K - k0);
    for (int e = tid; e < rows * kChunk; e += kThreads) {
      const int r = e / kChunk, k = e % kChunk;
      stage[e] = k < kc ? in(r, k0 + k) : 0.f;
    }
    __syncthreads();
    if (g < groups) {
      const int end = imin((g + 1) * span, kc);
      for (int k = g * span; k < end; k += 4) {  // past end: zero stage and zero padding
        const float w0 = static_cast<float>(w[slice.at(n, k0 + k)]);
        const float w1 = static_cast<float>(w[slice.at(n, k0 + k + 1)]);
        const float w2 = static_cast<float>(w[slice.at(n, k0 + k + 2)]);
        const float w3 = static_cast<float>(w[slice.at(n, k0 + k + 3)]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < rows) {
            const float4 h = *reinterpret_cast<const float4*>(stage + r * kChunk + k);
            acc[r] += h.x * w0 + h.y * w1 + h.z * w2 + h.w * w3;
          }
        }
      }
    }
    __syncthreads();
  }
  if (g < groups) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) part[(g * kRows + r) * N + n] = acc[r];
  }
  __syncthreads();
  for (int e = tid; e < rows * N; e += kThreads) {
    const int r = e / N, c = e % N;
    float s = 0.f;
    for (int gg = 0; gg < groups; ++gg) s += part[(gg * kRows + r) * N + c];
    out[r * N + c] = s;
  }
  __syncthreads();
}

// On tensor cores (T a half type): a tile of 16 rows (padded with zeros)
// times 16-column tiles of the slice, m16n16k16 with float accumulation.
// With at most 8 column tiles, each has 8 / tiles warps, which split the k
// tiles of each chunk between them; with more (up to 16), warp w takes
// column tiles w and w + 8 and every k tile. split: each input value enters
// as hi + lo, hi = T(v), lo = T(v - hi) (two products; `stage` holds both).
template <bool split, typename T, typename In>
__device__ void mma_product(const In& in, int rows, int K, const T* w, const Slice& slice,
                            T* stage, float* part, float* out) {
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  const int N = slice.cols, tiles = (N + kTile - 1) / kTile, warp = threadIdx.x / 32;
  const int per_tile = tiles <= kWarps ? kWarps / tiles : 1;
  const int tile0 = warp / per_tile, k_group = warp % per_tile;
  const int ld_stage = kChunk + 8;
  T* stage_lo = stage + kTile * ld_stage;
  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int kc = imin(kChunk, K - k0);
    for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk, k = e % kChunk;
      const float v = r < rows && k < kc ? in(r, k0 + k) : 0.f;
      const T hi = static_cast<T>(v);
      stage[r * ld_stage + k] = hi;
      if constexpr (split) stage_lo[r * ld_stage + k] = static_cast<T>(v - static_cast<float>(hi));
    }
    __syncthreads();
    const int k_tiles = (kc + kTile - 1) / kTile;
    for (int i = 0; i < 2; ++i) {
      const int tile = tiles <= kWarps ? (i == 0 ? tile0 : tiles) : warp + i * kWarps;
      if (tile >= tiles) continue;
      for (int kt = k_group; kt < k_tiles; kt += per_tile) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, W, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, W, wmma::col_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const W*>(stage) + kt * kTile, ld_stage);
        wmma::load_matrix_sync(
            b, reinterpret_cast<const W*>(w) + slice.at(tile * kTile, k0 + kt * kTile), slice.ld);
        wmma::mma_sync(acc[i], a, b, acc[i]);
        if constexpr (split) {
          wmma::load_matrix_sync(a, reinterpret_cast<const W*>(stage_lo) + kt * kTile, ld_stage);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    wmma::store_matrix_sync(part + (warp * 2 + i) * kTile * kTile, acc[i], kTile,
                            wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < rows * N; e += kThreads) {
    const int r = e / N, n = e % N, tile = n / kTile, c = r * kTile + n % kTile;
    float s = 0.f;
    if (tiles <= kWarps) {
      for (int g = 0; g < per_tile; ++g) s += part[(tile * per_tile + g) * 2 * kTile * kTile + c];
    } else {
      s = part[((tile % kWarps) * 2 + tile / kWarps) * kTile * kTile + c];
    }
    out[r * N + n] = s;
  }
  __syncthreads();
}

struct Steps {
  StepRows rows;
  bool reverse;
  __device__ int step(int k) const { return reverse ? rows.steps - 1 - k : k; }
  __device__ int count(int t) const {
    return rows.offsets != nullptr ? rows.offsets[rows.steps + t] : rows.batch;
  }
  __device__ int first(int t) const {
    return rows.offsets != nullptr ? rows.offsets[t] : t * rows.batch;
  }
  // Rows of the k-th step in processing order; 0 outside [0, steps).
  __device__ int count_at(int k) const {
    return k >= 0 && k < rows.steps ? count(step(k)) : 0;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ Directions<PersistentForward<T>> d, int u, int up) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the plan asks for compute capability 8.0 (bfloat16 tensor cores)
#else
  constexpr bool mma = kTensorCores<T>;
  constexpr int tile = mma ? kTile : kRows;  // batch rows per product
  cg::grid_group grid = cg::this_grid();
  const int per_direction = gridDim.x / d.count, block = blockIdx.x % per_direction;
  const PersistentForward<T>& p = d.dir[blockIdx.x / per_direction];
  const int H = p.hidden, P = p.proj, G = 4 * H, N = 4 * u, tid = threadIdx.x;
  const bool proj = p.w_hr != nullptr;
  const int j0 = block * u, nu = imin(u, H - j0);
  const int c0 = block * up, np = imin(up, P - c0);  // np <= 0: no columns
  const Steps S{p.rows, p.reverse};
  const ForwardSlices slices(H, P, u, up, proj, mma);
  const Shared L = forward_shared(sizeof(T), H, P, u, up, proj, mma);
  LSTM_DYNAMIC_SHARED(unsigned char, smem);
  T* w = reinterpret_cast<T*>(smem + L.w);    // column g*u + j: W_hh row g*H + j0 + j
  T* wr = reinterpret_cast<T*>(smem + L.wr);  // column c: W_hr row c0 + c
  float* part = reinterpret_cast<float*>(smem + L.part);
  float* out = reinterpret_cast<float*>(smem + L.out);
  auto product = [&](const auto& in, int rows, int K, const T* weights, const Slice& slice) {
    if constexpr (mma)
      mma_product<false>(in, rows, K, weights, slice, reinterpret_cast<T*>(smem + L.stage), part,
                         out);
    else
      fma_product(in, rows, K, weights, slice, reinterpret_cast<float*>(smem + L.stage), part,
                  out);
  };

  load_slice(w, slices.w, [&](int n, int k) {
    const int g = n / u, j = n % u;
    return j < nu ? p.w_hh[static_cast<int64_t>(g * H + j0 + j) * P + k] : T(0);
  });
  if (proj)
    load_slice(wr, slices.wr, [&](int c, int k) {
      return c < np ? p.w_hr[static_cast<int64_t>(c0 + c) * H + k] : T(0);
    });
  __syncthreads();

  for (int k = 0; k < S.rows.steps; ++k) {
    const int t = S.step(k), n = S.count(t), r0 = S.first(t);
    const int n_prev = S.count_at(k - 1), r_prev = k > 0 ? S.first(S.step(k - 1)) : 0;
    for (int b0 = 0; b0 < n; b0 += tile) {
      const int rows = imin(tile, n - b0);
      // h_{t-1} of each row: y of the previous step, or h0 where the row starts.
      auto h_prev = [&](int r, int kk) {
        const int b = b0 + r;
        return b < n_prev ? load_cg(p.y + static_cast<int64_t>(r_prev + b) * P + kk)
                          : static_cast<float>(p.h0[static_cast<int64_t>(b) * P + kk]);
      };
      product(h_prev, rows, P, w, slices.w);
      for (int e = tid; e < rows * nu; e += kThreads) {
        const int r = e / nu, j = e % nu, b = b0 + r, unit = j0 + j;
        const int64_t row = r0 + b;
        const float h = unit_forward(out[r * N + j], out[r * N + u + j], out[r * N + 2 * u + j],
                                     out[r * N + 3 * u + j], p.xg + row * G + unit,
                                     p.bias != nullptr ? p.bias + unit : nullptr, H,
                                     p.c_state[static_cast<int64_t>(b) * H + unit],
                                     p.gates != nullptr ? p.gates + row * G + unit : nullptr,
                                     p.cells != nullptr ? p.cells + row * H + unit : nullptr);
        if (proj)
          p.h_pre[static_cast<int64_t>(b) * H + unit] = static_cast<T>(h);
        else
          p.y[row * P + unit] = static_cast<T>(h);
      }
    }
    grid.sync();  // h_t (or h_pre) of every unit written
    if (!proj) continue;
    if (np > 0) {
      for (int b0 = 0; b0 < n; b0 += tile) {
        const int rows = imin(tile, n - b0);
        auto h_pre = [&](int r, int kk) {
          return load_cg(p.h_pre + static_cast<int64_t>(b0 + r) * H + kk);
        };
        product(h_pre, rows, H, wr, slices.wr);
        for (int e = tid; e < rows * np; e += kThreads) {
          const int r = e / np, c = e % np;
          p.y[static_cast<int64_t>(r0 + b0 + r) * P + c0 + c] = static_cast<T>(out[r * up + c]);
        }
      }
    }
    grid.sync();  // y_t complete; h_pre free for the next step
  }
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const __grid_constant__ Directions<PersistentBackward<T>> d, int u, int up) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the plan asks for compute capability 8.0 (bfloat16 tensor cores)
#else
  constexpr bool mma = kTensorCoresBackward<T>;
  constexpr int tile = mma ? kTile : kRows;  // batch rows per product
  cg::grid_group grid = cg::this_grid();
  const int per_direction = gridDim.x / d.count, block = blockIdx.x % per_direction;
  const PersistentBackward<T>& p = d.dir[blockIdx.x / per_direction];
  const int H = p.hidden, P = p.proj, G = 4 * H, tid = threadIdx.x;
  const bool proj = p.w_hr != nullptr;
  const int j0 = block * u, nu = imin(u, H - j0);
  const int c0 = block * up, np = imin(up, P - c0);
  const Steps S{p.rows, p.reverse};
  const BackwardSlices slices(H, P, u, up, proj, mma);
  const Shared L = backward_shared(sizeof(T), H, P, u, up, proj, mma);
  LSTM_DYNAMIC_SHARED(unsigned char, smem);
  T* w = reinterpret_cast<T*>(smem + L.w);    // column c: W_hh column c0 + c
  T* wr = reinterpret_cast<T*>(smem + L.wr);  // column j: W_hr column j0 + j
  float* part = reinterpret_cast<float*>(smem + L.part);
  float* out = reinterpret_cast<float*>(smem + L.out);
  auto product = [&](const auto& in, int rows, int K, const T* weights, const Slice& slice) {
    if constexpr (mma)
      mma_product<true>(in, rows, K, weights, slice, reinterpret_cast<T*>(smem + L.stage), part,
                        out);
    else
      fma_product(in, rows, K, weights, slice, reinterpret_cast<float*>(smem + L.stage), part,
                  out);
  };

  load_slice(w, slices.w, [&](int c, int k) {
    return c < np ? p.w_hh[static_cast<int64_t>(k) * P + c0 + c] : T(0);
  });
  if (proj)
    load_slice(wr, slices.wr, [&](int j, int k) {
      return j < nu ? p.w_hr[static_cast<int64_t>(k) * H + j0 + j] : T(0);
    });
  __syncthreads();

  for (int k = S.rows.steps - 1; k >= 0; --k) {
    const int t = S.step(k), n = S.count(t), r0 = S.first(t);
    const int n_prev = S.count_at(k - 1), r_prev = k > 0 ? S.first(S.step(k - 1)) : 0;
    for (int b0 = 0; b0 < n; b0 += tile) {
      const int rows = imin(tile, n - b0);
      if (proj) {  // dh' = dh_t W_hr for this block's units
        auto dh = [&](int r, int kk) {
          return load_cg(p.dh + static_cast<int64_t>(r0 + b0 + r) * P + kk);
        };
        product(dh, rows, P, wr, slices.wr);
      }
      for (int e = tid; e < rows * nu; e += kThreads) {
        const int r = e / nu, j = e % nu, b = b0 + r, unit = j0 + j;
        const int64_t row = r0 + b;
        // Without projection, column `unit` of dh is this block's own.
        const float dh = proj ? out[r * u + j] : p.dh[row * P + unit];
        unit_backward(dh, p.gates + row * G + unit, p.cells[row * H + unit],
                      b < n_prev ? p.cells[static_cast<int64_t>(r_prev + b) * H + unit]
                                 : p.c0[static_cast<int64_t>(b) * H + unit],
                      H, p.dc[static_cast<int64_t>(b) * H + unit], p.dgates + row * G + unit);
      }
    }
    grid.sync();  // dG_t of every unit written
    if (np > 0) {
      for (int b0 = 0; b0 < n; b0 += tile) {
        const int rows = imin(tile, n - b0);
        auto dg = [&](int r, int kk) {
          return load_cg(p.dgates + static_cast<int64_t>(r0 + b0 + r) * G + kk);
        };
        product(dg, rows, G, w, slices.w);
        // dh_{t-1} += dG_t W_hh: into the previous step's rows, or dh0 for
        // the rows that start at this step.
        for (int e = tid; e < rows * np; e += kThreads) {
          const int r = e / np, c = e % np, b = b0 + r, col = c0 + c;
          if (b < n_prev)
            p.dh[static_cast<int64_t>(r_prev + b) * P + col] += out[r * up + c];
          else
            p.dh0[static_cast<int64_t>(b) * P + col] = out[r * up + c];
        }
      }
    }
    if (proj)
      grid.sync();  // dh_{t-1} complete: every block's next dh' reads every column
    else
      __syncthreads();  // this block's columns of dh_{t-1} are its next units
  }
#endif
}

template <typename T>
int resident_per_sm(void (*kernel)(T, int, int), size_t shared) {
  int blocks = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared)) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, shared) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return blocks;
}

// u hidden units per block: at least kMinUnits, at most as many blocks as
// multiprocessors (one block each: the weight slices fill their shared
// memory), which `directions` share equally; up projection columns per block.
template <typename Params, typename Layout>
Plan plan(int H, int P, bool proj, int directions, size_t t_size, Layout layout,
          void (*kernel)(Params, int, int)) {
  Plan plan;
  plan.directions = directions;
  int device = 0, cooperative = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    plan.why = "the device cannot be queried";
    return plan;
  }
  if (!cooperative) {
    plan.why = "the device has no cooperative launch";
    return plan;
  }
  const int sms_each = std::max(1, sms / directions);
  const int u = std::max(kMinUnits, (H + sms_each - 1) / sms_each);
  const int blocks = (H + u - 1) / u;  // per direction
  const int up = proj ? (P + blocks - 1) / blocks : u;
  if (4 * u > kThreads || up > kThreads) {
    plan.why = "more hidden units per block than the kernels' threads";
    return plan;
  }
  const size_t shared = layout(t_size, H, P, u, up, proj).total;
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    (void)cudaGetLastError();
    plan.why = "the device cannot be queried";
    return plan;
  }
  if (prop.major < 8) {
    plan.why = "the persistent kernels need compute capability 8.0";
    return plan;
  }
  if (shared > prop.sharedMemPerBlockOptin) {
    plan.why = "the recurrent weights do not fit in shared memory";
    return plan;
  }
  if (static_cast<long long>(resident_per_sm(kernel, shared)) * sms < blocks * directions) {
    plan.why = "the grid cannot be resident at once";
    return plan;
  }
  plan.persistent = true;
  plan.blocks = blocks * directions;
  plan.units = u;
  plan.proj_units = up;
  plan.shared = shared;
  return plan;
}

}  // namespace

template <typename T>
Plan plan_forward(int hidden, int proj_size, int directions) {
  const bool proj = proj_size != hidden;
  auto shared = [](size_t t_size, int H, int P, int u, int up, bool proj) {
    return forward_shared(t_size, H, P, u, up, proj, kTensorCores<T>);
  };
  return plan(hidden, proj_size, proj, directions, sizeof(T), shared, &forward_kernel<T>);
}

template <typename T>
Plan plan_backward(int hidden, int proj_size, int directions) {
  const bool proj = proj_size != hidden;
  auto shared = [](size_t t_size, int H, int P, int u, int up, bool proj) {
    return backward_shared(t_size, H, P, u, up, proj, kTensorCoresBackward<T>);
  };
  return plan(hidden, proj_size, proj, directions, sizeof(T), shared, &backward_kernel<T>);
}

// The kernel's dynamic shared memory limit raised to the plan's (the
// attribute is the kernel's, whichever plan set it last).
template <typename K>
void allow_shared(K* kernel, const Plan& plan) {
  LSTM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.shared)));
}

// One launch for the plan's directions: dirs[0..plan.directions).
template <typename T>
void persistent_forward(const PersistentForward<T>* dirs, const Plan& plan, cudaStream_t stream) {
  allow_shared(&forward_kernel<T>, plan);
  const Directions<PersistentForward<T>> d{{dirs[0], dirs[plan.directions - 1]}, plan.directions};
  launch<kThreads>(&forward_kernel<T>, dim3(plan.blocks), dim3(kThreads), plan.shared, stream,
                   true, d, plan.units, plan.proj_units);
}

template <typename T>
void persistent_backward(const PersistentBackward<T>* dirs, const Plan& plan,
                         cudaStream_t stream) {
  allow_shared(&backward_kernel<T>, plan);
  const Directions<PersistentBackward<T>> d{{dirs[0], dirs[plan.directions - 1]},
                                            plan.directions};
  launch<kThreads>(&backward_kernel<T>, dim3(plan.blocks), dim3(kThreads), plan.shared, stream,
                   true, d, plan.units, plan.proj_units);
}

#define LSTM_FUSED_INSTANTIATE(T)                                                            \
  template Plan plan_forward<T>(int, int, int);                                              \
  template Plan plan_backward<T>(int, int, int);                                             \
  template void persistent_forward<T>(const PersistentForward<T>*, const Plan&, cudaStream_t); \
  template void persistent_backward<T>(const PersistentBackward<T>*, const Plan&, cudaStream_t);
LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(c10::Half)
LSTM_FUSED_INSTANTIATE(c10::BFloat16)
#undef LSTM_FUSED_INSTANTIATE

}  // namespace lstm_fused::cuda
