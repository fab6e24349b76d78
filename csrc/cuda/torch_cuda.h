// The CUDA side of ATen that csrc/cuda's host code uses, from one place: the
// current stream, the device guard, the device's properties, a GEMM with a
// float output for half inputs, and the dispatch key the ops register under.
// With LSTM_FUSED_EMU (the emulation test build) these are CPU stand-ins and
// the "CUDA" ops take CPU tensors; the host code is the same.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "platform.h"

#ifdef LSTM_FUSED_EMU

namespace lstm_fused::cuda {
inline cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp prop = [] {
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    return p;
  }();
  return prop;
}
// out = a b in out's dtype (float for half a and b): ATen's CPU mm has no
// out_dtype, so through float inputs (float products and sums, as cuBLAS).
inline void mm_out_dtype(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}
inline bool capturing(cudaStream_t) { return false; }
inline at::Tensor to_device(const std::vector<int32_t>& v, const at::Device&) {
  return at::tensor(v, at::kInt);
}
}  // namespace lstm_fused::cuda
#define LSTM_FUSED_DISPATCH_KEY CPU
#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace lstm_fused::cuda {
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline const cudaDeviceProp& device_properties() {
  return *at::cuda::getCurrentDeviceProperties();
}
inline void mm_out_dtype(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b, out.scalar_type());
}
// Whether `stream` is capturing a CUDA graph.
inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  LSTM_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}
// v on `device`, through pinned memory without waiting (the caching host
// allocator keeps the pinned block until the copy is done).
inline at::Tensor to_device(const std::vector<int32_t>& v, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(v.size())},
                              at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::copy(v.begin(), v.end(), host.data_ptr<int32_t>());
  return host.to(device, /*non_blocking=*/true);
}
}  // namespace lstm_fused::cuda
#define LSTM_FUSED_DISPATCH_KEY CUDA

#endif
