// CUDA kernels of one LSTM time step, each one launch.
//
// forward_step fuses the recurrent matmul h_{t-1} W_hh^T of all four gates
// with the cell: a block owns kUnits hidden units and kRows batch rows, runs
// the four dot products of its units over tiles of W_hh and h_{t-1} staged in
// shared memory, then applies cell_forward (lstm_cell.h) to the sums in
// registers and writes the activations, c_t and h_t. backward_step does the
// same for dh W_hr (projection only) and cell_backward. Math in A (float for
// the half types), storage in T.
#include "lstm_cuda.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "unit.h"

namespace lstm_fused::cuda {
namespace {

constexpr int kUnits = 32;                   // hidden units per block (threadIdx.x)
constexpr int kLanes = 8;                    // threadIdx.y
constexpr int kRowsPerThread = 2;            // batch rows per thread
constexpr int kRows = kLanes * kRowsPerThread;  // batch rows per block
constexpr int kK = 32;                       // reduction tile
constexpr int kThreads = kUnits * kLanes;

dim3 grid_for(int n, int hidden) {
  return dim3((hidden + kUnits - 1) / kUnits, (n + kRows - 1) / kRows);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardStep<T, A> p) {
  LSTM_SHARED(sw, A[4][kK][kUnits + 1]);  // W_hh tile, [gate][k][unit] (+1: no bank conflicts)
  LSTM_SHARED(sh, A[kRows][kK]);          // h_{t-1} tile
  const int H = p.hidden, P = p.proj, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kUnits + tx;
  const int j0 = blockIdx.x * kUnits, b0 = blockIdx.y * kRows;

  A acc[4][kRowsPerThread];
#pragma unroll
  for (int g = 0; g < 4; ++g)
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) acc[g][r] = A(0);

  for (int k0 = 0; k0 < P; k0 += kK) {
    // Consecutive threads read consecutive k of one weight row (coalesced).
    for (int e = tid; e < 4 * kUnits * kK; e += kThreads) {
      const int kk = e % kK, row = e / kK, g = row / kUnits, u = row % kUnits;
      const int j = j0 + u, k = k0 + kk;
      sw[g][kk][u] = (j < H && k < P)
                         ? static_cast<A>(p.w_hh[static_cast<int64_t>(g * H + j) * P + k])
                         : A(0);
    }
    for (int e = tid; e < kRows * kK; e += kThreads) {
      const int kk = e % kK, r = e / kK, b = b0 + r, k = k0 + kk;
      A v = A(0);
      if (b < p.n && k < P) {
        const T* src = b < p.n_prev ? p.h_prev : p.h0;
        v = static_cast<A>(src[static_cast<int64_t>(b) * P + k]);
      }
      sh[r][kk] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kK; ++kk) {
      const A w0 = sw[0][kk][tx], w1 = sw[1][kk][tx], w2 = sw[2][kk][tx], w3 = sw[3][kk][tx];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const A h = sh[ty + r * kLanes][kk];  // one address per warp: broadcast
        acc[0][r] += w0 * h;
        acc[1][r] += w1 * h;
        acc[2][r] += w2 * h;
        acc[3][r] += w3 * h;
      }
    }
    __syncthreads();
  }

  const int j = j0 + tx;
  if (j >= H) return;
  const int64_t G = 4 * static_cast<int64_t>(H);
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int b = b0 + ty + r * kLanes;
    if (b >= p.n) continue;
    const int64_t bh = static_cast<int64_t>(b) * H + j;
    const A h = unit_forward(acc[0][r], acc[1][r], acc[2][r], acc[3][r], p.xg + b * G + j,
                             p.bias != nullptr ? p.bias + j : nullptr, H, p.c_state[bh],
                             p.gates + b * G + j, p.cells + bh);
    p.h_out[static_cast<int64_t>(b) * p.ld_h + j] = static_cast<T>(h);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) backward_step_kernel(const BackwardStep<T, A> p) {
  LSTM_SHARED(sw, A[kK][kUnits + 1]);  // W_hr tile, [k][unit]
  LSTM_SHARED(sh, A[kRows][kK]);       // dh tile
  const int H = p.hidden, P = p.proj, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kUnits + tx;
  const int j0 = blockIdx.x * kUnits, b0 = blockIdx.y * kRows;

  // With projection h = W_hr h', so dh' = dh W_hr: dot products over P.
  A dh_pre[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) dh_pre[r] = A(0);
  if (p.w_hr != nullptr) {  // the same for the whole grid
    for (int k0 = 0; k0 < P; k0 += kK) {
      for (int e = tid; e < kK * kUnits; e += kThreads) {
        const int u = e % kUnits, kk = e / kUnits, j = j0 + u, k = k0 + kk;
        sw[kk][u] = (j < H && k < P) ? static_cast<A>(p.w_hr[static_cast<int64_t>(k) * H + j])
                                     : A(0);
      }
      for (int e = tid; e < kRows * kK; e += kThreads) {
        const int kk = e % kK, r = e / kK, b = b0 + r, k = k0 + kk;
        sh[r][kk] = (b < p.n && k < P) ? p.dh[static_cast<int64_t>(b) * P + k] : A(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kK; ++kk) {
        const A w = sw[kk][tx];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) dh_pre[r] += w * sh[ty + r * kLanes][kk];
      }
      __syncthreads();
    }
  }

  const int j = j0 + tx;
  if (j >= H) return;
  const int64_t G = 4 * static_cast<int64_t>(H);
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int b = b0 + ty + r * kLanes;
    if (b >= p.n) continue;
    const int64_t bh = static_cast<int64_t>(b) * H + j;
    const A dh = p.w_hr != nullptr ? dh_pre[r] : p.dh[static_cast<int64_t>(b) * P + j];
    unit_backward(dh, p.gates + b * G + j, p.cells[bh], b < p.n_prev ? p.c_prev[bh] : p.c0[bh],
                  H, p.dc[bh], p.dgates + b * G + j);
  }
}

}  // namespace

template <typename T, typename A>
void forward_step(const ForwardStep<T, A>& p, cudaStream_t stream) {
  launch<kThreads>(&forward_step_kernel<T, A>, grid_for(p.n, p.hidden), dim3(kUnits, kLanes), 0,
                   stream, false, p);
}

template <typename T, typename A>
void backward_step(const BackwardStep<T, A>& p, cudaStream_t stream) {
  launch<kThreads>(&backward_step_kernel<T, A>, grid_for(p.n, p.hidden), dim3(kUnits, kLanes), 0,
                   stream, false, p);
}

static_assert(kRows * 65535LL >= kMaxBatch, "gridDim.y is at most 65535");

#define LSTM_FUSED_INSTANTIATE(T, A)                                              \
  template void forward_step<T, A>(const ForwardStep<T, A>&, cudaStream_t);       \
  template void backward_step<T, A>(const BackwardStep<T, A>&, cudaStream_t);
LSTM_FUSED_INSTANTIATE(float, float)
LSTM_FUSED_INSTANTIATE(double, double)
LSTM_FUSED_INSTANTIATE(c10::Half, float)
LSTM_FUSED_INSTANTIATE(c10::BFloat16, float)
#undef LSTM_FUSED_INSTANTIATE

}  // namespace lstm_fused::cuda
