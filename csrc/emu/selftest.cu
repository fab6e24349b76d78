// Kernels that exercise the emulator itself (tests/test_cuda_emu.py): warp
// operations, atomics, wmma, grid.sync, launch checks, deadlock detection,
// the poisoning of shared memory and a planted race. Each is an op of the
// test-only library lstm_fused_emu_selftest (CPU tensors; the emulation build
// only: no device code of the package lives here).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cuda/platform.h"

namespace {

using lstm_fused::cuda::launch;
namespace cg = cooperative_groups;
namespace wmma = nvcuda::wmma;

constexpr int kWarps = 2;

// out[k][t] for the 64 threads t of two warps: shuffles and votes of v = t.
__global__ void __launch_bounds__(64) warp_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  const unsigned all = 0xffffffffu;
  int k = 0;
  auto put = [&](int v) { out[(k++) * 64 + t] = v; };
  put(__shfl_sync(all, t * 10, (lane + 3) % 32));
  put(__shfl_xor_sync(all, t * 10, 5));
  put(__shfl_down_sync(all, t * 10, 4));
  put(__shfl_up_sync(all, t * 10, 4));
  put(__shfl_sync(all, t * 10, lane / 8, 8));  // width 8: lane/8 of each group of 8
  put(static_cast<int>(__ballot_sync(all, t % 3 == 0)));
  put(__all_sync(all, t < 100));
  put(__any_sync(all, t == 40));
  float f = static_cast<float>(t);
  for (int d = 16; d > 0; d /= 2) f += __shfl_xor_sync(all, f, d);  // warp sum
  put(static_cast<int>(f));
}

at::Tensor warp_ops() {
  at::Tensor out = at::full({9, 64}, -1, at::kInt);
  launch<64>(&warp_kernel, dim3(1), dim3(64), 0, nullptr, false, out.data_ptr<int>());
  return out;
}

__global__ void __launch_bounds__(256) atomic_kernel(int* counter, float* sum, int* maximum) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5f);
  atomicMax(maximum, t);
}

at::Tensor atomics(int64_t blocks) {
  at::Tensor counter = at::zeros({1}, at::kInt), sum = at::zeros({1}), maximum = at::zeros({1}, at::kInt);
  launch<256>(&atomic_kernel, dim3(blocks), dim3(256), 0, nullptr, false,
              counter.data_ptr<int>(), sum.data_ptr<float>(), maximum.data_ptr<int>());
  return at::stack({counter.to(at::kFloat), sum, maximum.to(at::kFloat)});
}

// d = a b + c, one 16x16x16 tile per warp, a and b in T (half or bfloat16).
template <typename T, typename W>
__global__ void __launch_bounds__(32 * kWarps) mma_kernel(const T* a, const T* b, const float* c,
                                                          float* d) {
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  const W* aw = reinterpret_cast<const W*>(a) + warp * 256;
  const W* bw = reinterpret_cast<const W*>(b) + warp * 256;
  wmma::load_matrix_sync(fa, aw, 16);
  wmma::load_matrix_sync(fb, bw, 16);  // column-major: b stored as [col][k]
  wmma::load_matrix_sync(acc, c + warp * 256, 16, wmma::mem_row_major);
  wmma::mma_sync(acc, fa, fb, acc);
  for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= 2.0f;  // element-wise, any layout
  wmma::store_matrix_sync(d + warp * 256, acc, 16, wmma::mem_row_major);
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b_cols, const at::Tensor& c) {
  at::Tensor d = at::empty({kWarps, 16, 16});
  if (a.scalar_type() == at::kHalf)
    launch<32 * kWarps>(&mma_kernel<c10::Half, __half>, dim3(1), dim3(32 * kWarps), 0, nullptr,
                        false, a.data_ptr<c10::Half>(), b_cols.data_ptr<c10::Half>(),
                        c.data_ptr<float>(), d.data_ptr<float>());
  else
    launch<32 * kWarps>(&mma_kernel<c10::BFloat16, __nv_bfloat16>, dim3(1), dim3(32 * kWarps), 0,
                        nullptr, false, a.data_ptr<c10::BFloat16>(),
                        b_cols.data_ptr<c10::BFloat16>(), c.data_ptr<float>(),
                        d.data_ptr<float>());
  return d;
}

// Every block writes its slot, the grid synchronizes, every block reads its
// neighbour's: rounds times, each round's values new.
__global__ void __launch_bounds__(128) grid_kernel(int* slots, int* seen, int rounds) {
  cg::grid_group grid = cg::this_grid();
  const int b = blockIdx.x, n = gridDim.x;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) slots[b] = r * 1000 + b;
    grid.sync();
    if (threadIdx.x == 0) seen[r * n + b] = slots[(b + 1) % n];
    grid.sync();
  }
}

at::Tensor grid_sync(int64_t blocks, int64_t rounds, bool cooperative) {
  at::Tensor slots = at::zeros({blocks}, at::kInt), seen = at::zeros({rounds, blocks}, at::kInt);
  launch<128>(&grid_kernel, dim3(blocks), dim3(128), 0, nullptr, cooperative,
              slots.data_ptr<int>(), seen.data_ptr<int>(), static_cast<int>(rounds));
  return seen;
}

// A block's threads each write s[t] and read s[t + 1]: with the barrier
// between, each reads its neighbour's value; without, it reads memory not
// yet written (shared memory starts as 0xFF bytes).
__global__ void __launch_bounds__(128) neighbour_kernel(float* out, bool barrier) {
  LSTM_SHARED(s, float[128]);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[t] = s[(t + 1) % 128];
}

at::Tensor neighbours(bool barrier) {
  at::Tensor out = at::empty({128});
  launch<128>(&neighbour_kernel, dim3(1), dim3(128), 0, nullptr, false, out.data_ptr<float>(),
              barrier);
  return out;
}

// Reads `count` floats of dynamic shared memory no thread wrote.
__global__ void __launch_bounds__(32) unwritten_kernel(float* out, int count) {
  LSTM_DYNAMIC_SHARED(float, s);
  for (int i = threadIdx.x; i < count; i += 32) out[i] = s[i];
}

at::Tensor unwritten_shared(int64_t count, int64_t limit) {
  if (limit > 0)
    TORCH_CHECK(cudaFuncSetAttribute(&unwritten_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(limit)) == cudaSuccess,
                "cudaFuncSetAttribute failed: ", lstm_fused::cuda::launch_error_detail());
  at::Tensor out = at::zeros({count});
  launch<32>(&unwritten_kernel, dim3(1), dim3(32), count * sizeof(float), nullptr, false,
             out.data_ptr<float>(), static_cast<int>(count));
  return out;
}

// Lanes 1..31 of warp 0 wait at a warp barrier that its lane 0 never reaches
// (it waits at __syncthreads, with warp 1): no thread can go on.
__global__ void __launch_bounds__(64) deadlock_kernel() {
  if (threadIdx.x == 0 || threadIdx.x >= 32)
    __syncthreads();
  else
    __syncwarp();
}

void deadlock() { launch<64>(&deadlock_kernel, dim3(1), dim3(64), 0, nullptr, false); }

__global__ void __launch_bounds__(64) empty_kernel() {}

// A launch of empty_kernel (bounded at 64 threads); failures raise.
void configure(int64_t threads, int64_t blocks, int64_t shared, bool cooperative) {
  launch<1024>(&empty_kernel, dim3(static_cast<unsigned>(blocks)),
               dim3(static_cast<unsigned>(threads)), static_cast<size_t>(shared), nullptr,
               cooperative);
}

void over_bound() { launch<64>(&empty_kernel, dim3(1), dim3(65), 0, nullptr, false); }

int64_t resident_blocks(int64_t threads, int64_t shared) {
  int per_sm = 0;
  TORCH_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, &empty_kernel,
                                                            static_cast<int>(threads),
                                                            static_cast<size_t>(shared)) ==
              cudaSuccess);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  return static_cast<int64_t>(per_sm) * prop.multiProcessorCount;
}

}  // namespace

TORCH_LIBRARY(lstm_fused_emu_selftest, m) {
  m.def("warp_ops() -> Tensor", &warp_ops);
  m.def("atomics(int blocks) -> Tensor", &atomics);
  m.def("mma(Tensor a, Tensor b_cols, Tensor c) -> Tensor", &mma);
  m.def("grid_sync(int blocks, int rounds, bool cooperative) -> Tensor", &grid_sync);
  m.def("neighbours(bool barrier) -> Tensor", &neighbours);
  m.def("unwritten_shared(int count, int limit) -> Tensor", &unwritten_shared);
  m.def("deadlock() -> ()", &deadlock);
  m.def("configure(int threads, int blocks, int shared, bool cooperative) -> ()", &configure);
  m.def("over_bound() -> ()", &over_bound);
  m.def("resident_blocks(int threads, int shared) -> int", &resident_blocks);
}
