// What csrc/cuda uses of the CUDA platform, from one place: the CUDA runtime,
// cooperative groups and wmma, or their emulation on the host (csrc/emu/)
// when LSTM_FUSED_EMU is defined (the test build of tests/test_cuda_emu.py).
//
// The two rewrites that let a kernel compile as host C++ too:
//   LSTM_SHARED(name, type)        for `__shared__ type name;` (type may be an array)
//   LSTM_DYNAMIC_SHARED(T, name)   `T* name` at the launch's dynamic shared memory
// and launch<kMaxThreads>(kernel, ...) in place of <<<...>>>: it checks the
// block against the kernel's launch bound and turns a launch error into an
// exception.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <utility>

#ifdef LSTM_FUSED_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif
#define LSTM_SHARED(name, ...) __shared__ ::lstm_fused::cuda::type_t<__VA_ARGS__> name
#define LSTM_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)
#endif

namespace lstm_fused::cuda {

template <typename T>
using type_t = T;

inline const char* launch_error_detail() {
#ifdef LSTM_FUSED_EMU
  return emu::last_error_detail();
#else
  return "";
#endif
}

// A CUDA runtime call that must succeed: its error as an exception.
#define LSTM_CUDA_CHECK(expr)                                                            \
  do {                                                                                   \
    const cudaError_t lstm_cuda_err = (expr);                                            \
    if (lstm_cuda_err != cudaSuccess) {                                                  \
      (void)cudaGetLastError();                                                          \
      TORCH_CHECK(false, "lstm_fused: CUDA error: ", cudaGetErrorString(lstm_cuda_err), \
                  " ", ::lstm_fused::cuda::launch_error_detail());                       \
    }                                                                                    \
  } while (0)

// Launches kernel, whose __launch_bounds__ is kMaxThreads, with `shared`
// bytes of dynamic shared memory on `stream`. Cooperative: every block
// resident at once (cooperative_groups::this_grid().sync()).
template <int kMaxThreads, typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
            cudaStream_t stream, bool cooperative, Args&&... args) {
  TORCH_CHECK(block.x * block.y * block.z <= kMaxThreads, "lstm_fused: a block of ",
              block.x * block.y * block.z, " threads for a kernel bounded at ", kMaxThreads);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  // By position (grid, block, shared bytes, stream, attributes): the
  // emulation's built-in variables are macros named like two of the fields.
  cudaLaunchConfig_t config = {grid, block, shared, stream, cooperative ? attr : nullptr,
                               cooperative ? 1u : 0u};
  LSTM_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace lstm_fused::cuda
