// Shared by the device-specific op implementations: argument checks and the
// sizes of one LSTM layer call, taken from tensors before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lstm_fused {

struct LayerSizes {
  int64_t steps, rows, batch, input, hidden, proj;
  std::vector<int64_t> batch_sizes;  // [steps], on the host
};

// Checks every argument of a layer call (shapes, dtypes, devices,
// batch_sizes) and returns the sizes. Throws c10::Error with a clear message.
LayerSizes check_layer_args(const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& batch_sizes);

// Checks an optional tensor against a shape and the dtype and device of
// `like`; returns it contiguous, or an undefined tensor when absent.
at::Tensor check_like(const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                      const at::Tensor& like, const char* name);

}  // namespace lstm_fused
