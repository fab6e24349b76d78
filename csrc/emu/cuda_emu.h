// The CUDA execution model on the host, for testing csrc/cuda without a GPU.
//
// A kernel source (.cu) compiles as host C++ against this header (see
// csrc/cuda/platform.h, which includes it when LSTM_FUSED_EMU is defined).
// A launch runs every CUDA thread of a block as a fiber (its own stack,
// switched with swapcontext) on one host thread:
//   - A fiber runs until it waits at a barrier or returns; the block's host
//     thread then runs the next one that can run, in thread order (or
//     LSTM_FUSED_EMU_SCHEDULE=reverse / random:SEED). __syncthreads() holds a
//     fiber until every live thread of the block has arrived; a thread that
//     returned no longer counts (as exited threads on sm_70+). Threads held at
//     different barriers with none able to run is a deadlock, reported as the
//     launch's error.
//   - Blocks run one after another on the launching thread, or all at once,
//     each on a host thread of its own: always for a cooperative launch
//     (cooperative_groups::this_grid().sync() holds every thread of the grid),
//     and for every launch with LSTM_FUSED_EMU_CONCURRENT=1.
//   - Warp operations (__shfl_*_sync, __ballot_sync, __syncwarp, wmma::mma_sync)
//     wait for every live lane of the warp; the mask must name all of them
//     (partial masks are not emulated).
//   - Atomics are std::atomic_ref operations; fences are seq_cst fences.
//   - nvcuda::wmma fragments (m16n16k16; half/bfloat16 inputs, float
//     accumulator) follow the documented semantics: each lane owns an
//     unspecified share of the accumulator's elements, a and b fragments hold
//     the whole tile; mma_sync sums in float in k order.
//   - Shared memory (static via LSTM_SHARED, dynamic via LSTM_DYNAMIC_SHARED)
//     is one arena per block, filled with 0xFF (NaN in every float type) when
//     the block starts, so a read of memory no thread wrote shows.
//   - Launches are checked: block and grid limits, the kernel's launch bound
//     (cuda::launch), static shared memory <= 48 KB, dynamic shared memory <=
//     the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KB unless
//     raised) and the device's opt-in limit, and a cooperative grid <= the
//     blocks the occupancy API says can be resident. A failed check, or an
//     error inside a kernel, is the launch's error (cudaGetLastError).
//   - Under ThreadSanitizer every fiber is a thread of its own to it, and the
//     barriers tell it what they order: a missing barrier is a data race.
// What it cannot show: timing, occupancy and register pressure, the GPU's
// weaker memory ordering (every access here is ordered by the host), L1
// staleness, bank conflicts, and cuBLAS (ATen runs on the CPU).
// Knobs (environment, read per launch):
//   LSTM_FUSED_EMU_SMS=N            multiprocessors of the emulated device (default 8;
//                                   read once per process)
//   LSTM_FUSED_EMU_CONCURRENT=1     run every launch with all blocks at once
//   LSTM_FUSED_EMU_SCHEDULE=S       order in which a block's runnable threads run:
//                                   forward (default), reverse, random:SEED
//   LSTM_FUSED_EMU_DROP_SYNC=F[:L]  make the barriers (__syncthreads, block.sync,
//                                   grid.sync) in functions whose name contains F
//                                   (at line L) do nothing: a planted missing barrier
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)

// ---- vector types and built-in variables -------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

namespace emu {
// The built-in variables of the CUDA thread running now.
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
const Builtins& builtins();
}  // namespace emu
constexpr int warpSize = 32;

// ---- the runtime API subset ----------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrCooperativeLaunch = 95, cudaDevAttrMultiProcessorCount = 16 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaLaunchAttributeID { cudaLaunchAttributeIgnore = 0, cudaLaunchAttributeCooperative = 2 };

struct cudaLaunchAttributeValue {
  int cooperative;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int maxThreadsPerMultiProcessor;
  int maxBlocksPerMultiProcessor;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int warpSize;
  int cooperativeLaunch;
};

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);

namespace emu {

// The launch: checks, then `body` once per CUDA thread, with the built-in
// variables set. Returns (and records as the last error) any failure.
cudaError_t launch(const cudaLaunchConfig_t& config, const void* kernel,
                   const std::function<void()>& body);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
// What the last failed launch of this host thread found (cudaGetErrorString
// gives only the error's name).
const char* last_error_detail();
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t dynamic_shared);

// Kernel-side services of the thread running this CUDA thread.
void sync_block(const std::source_location& where);
void sync_grid(const std::source_location& where);
void sync_warp(unsigned mask);
// Exchanges 8-byte values among the lanes of the warp: returns the value of
// lane `src` after every lane of `mask` wrote its own.
uint64_t warp_exchange(unsigned mask, uint64_t value, int src);
unsigned warp_ballot(unsigned mask, bool predicate);
unsigned lane_id();
// Shared memory: the static allocation of `bytes` (aligned) at this point of
// the kernel, the same address in every thread of the block; and the base of
// the dynamic allocation.
void* shared_static(size_t bytes, size_t align);
void* shared_dynamic();
[[noreturn]] void kernel_error(const char* what);

template <typename T>
T shuffle(unsigned mask, T value, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of 8 bytes at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                               Args&&... args) {
  // Each CUDA thread gets its own copy of the parameters, as on a GPU.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return emu::launch(*config, reinterpret_cast<const void*>(kernel),
                     [&params, kernel] { std::apply(kernel, params); });
}

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K* kernel, int block_size,
                                                          size_t dynamic_shared) {
  return emu::occupancy(blocks, reinterpret_cast<const void*>(kernel), block_size,
                        dynamic_shared);
}

// ---- built-in variables ----------------------------------------------------------
// (Macros: code after this point must not name a member gridDim or blockDim;
// cuda::launch fills cudaLaunchConfig_t by position.)
#define threadIdx (::emu::builtins().thread_idx)
#define blockIdx (::emu::builtins().block_idx)
#define blockDim (::emu::builtins().block_dim)
#define gridDim (::emu::builtins().grid_dim)

// ---- kernel-side intrinsics ----------------------------------------------------
inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  emu::sync_block(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::sync_warp(mask); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = static_cast<int>(emu::lane_id());
  const int base = lane & ~(width - 1);
  return emu::shuffle(mask, v, base + (src & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int lane = static_cast<int>(emu::lane_id());
  const int base = lane & ~(width - 1);
  return emu::shuffle(mask, v, base + ((lane - base) ^ lane_mask) % width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(emu::lane_id());
  const int base = lane & ~(width - 1);
  const int src = lane - base + static_cast<int>(delta);
  return emu::shuffle(mask, v, src < width ? lane + static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(emu::lane_id());
  const int base = lane & ~(width - 1);
  const int src = lane - base - static_cast<int>(delta);
  return emu::shuffle(mask, v, src >= 0 ? lane - static_cast<int>(delta) : lane);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::warp_ballot(mask, predicate != 0);
}
inline int __all_sync(unsigned mask, int predicate) {
  const unsigned yes = emu::warp_ballot(mask, predicate != 0);
  return yes == emu::warp_ballot(mask, true);
}
inline int __any_sync(unsigned mask, int predicate) {
  return emu::warp_ballot(mask, predicate != 0) != 0;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}

// Cache-hinted loads and stores: plain accesses here.
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
void __stcg(T* p, T v) {
  *p = v;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }

// ---- half types ------------------------------------------------------------------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }

// ---- cooperative groups ------------------------------------------------------------
namespace cooperative_groups {
class thread_block {
 public:
  void sync(const std::source_location& where = std::source_location::current()) const {
    emu::sync_block(where);
  }
  unsigned thread_rank() const {
    return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
};
class grid_group {
 public:
  void sync(const std::source_location& where = std::source_location::current()) const {
    emu::sync_grid(where);
  }
  bool is_valid() const { return true; }
  unsigned long long block_rank() const {
    return (static_cast<unsigned long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
           blockIdx.x;
  }
  unsigned long long num_blocks() const {
    return static_cast<unsigned long long>(gridDim.x) * gridDim.y * gridDim.z;
  }
  unsigned long long thread_rank() const {
    return block_rank() * (blockDim.x * blockDim.y * blockDim.z) + thread_block().thread_rank();
  }
};
inline thread_block this_thread_block() { return {}; }
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- tensor-core fragments (nvcuda::wmma), 16x16x16 -------------------------------
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// a (16x16, [row][k]) and b (16x16, [k][col]) hold the whole tile in every lane.
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  static constexpr int num_elements = 256;
  T x[256];
};
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  static constexpr int num_elements = 256;
  T x[256];
};
// The accumulator: lane l owns elements l, l + 32, ... of the row-major tile.
template <int M, int N, int K, typename T>
struct fragment<accumulator, M, N, K, T, void> {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  static constexpr int num_elements = 8;
  T x[8];
};

template <typename Frag, typename V>
void fill_fragment(Frag& f, const V& v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[r * 16 + k] = row ? p[r * ldm + k] : p[k * ldm + r];
}
template <int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < 16; ++c) f.x[k * 16 + c] = row ? p[k * ldm + c] : p[c * ldm + k];
}
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  const unsigned lane = emu::lane_id();
  for (int e = 0; e < 8; ++e) {
    const unsigned i = e * 32 + lane, r = i / 16, c = i % 16;
    f.x[e] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}
template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                       layout_t layout) {
  const unsigned lane = emu::lane_id();
  for (int e = 0; e < 8; ++e) {
    const unsigned i = e * 32 + lane, r = i / 16, c = i % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void>& d,
              const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, TC, void>& c) {
  const unsigned lane = emu::lane_id();
  TC out[8];
  for (int e = 0; e < 8; ++e) {
    const unsigned i = e * 32 + lane, r = i / 16, col = i % 16;
    float acc = static_cast<float>(c.x[e]);
    for (int k = 0; k < 16; ++k)
      acc += static_cast<float>(a.x[r * 16 + k]) * static_cast<float>(b.x[k * 16 + col]);
    out[e] = static_cast<TC>(acc);
  }
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
  __syncwarp();  // warp-wide: every lane of the warp must take part
}
}  // namespace nvcuda::wmma

// ---- shared memory declarations (the mechanical rewrite of __shared__) --------------
// LSTM_SHARED(name, type) declares a block-shared variable of `type` (an
// array type is fine); LSTM_DYNAMIC_SHARED(type, name) points `name` (a T*)
// at the launch's dynamic shared memory. csrc/cuda/platform.h defines the
// CUDA forms.
namespace emu {
template <typename T>
using type_t = T;
}
#define LSTM_SHARED(name, ...)                       \
  auto& name = *static_cast<::emu::type_t<__VA_ARGS__>*>( \
      ::emu::shared_static(sizeof(__VA_ARGS__), alignof(__VA_ARGS__)))
#define LSTM_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::shared_dynamic())
