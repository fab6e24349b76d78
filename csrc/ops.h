// Shared by the device-specific op implementations: argument checks and the
// sizes of one LSTM layer call, taken from tensors before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
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

// A layer call after check_layer_args (and the device's own checks): the
// arguments made contiguous and the outputs allocated. Optional arguments
// that are absent stay undefined. gates [rows, 4H] and cells [rows, H] are
// allocated only with save; without, the op returns both with 0 rows (a
// device that needs them as workspace allocates them itself).
struct ForwardCall {
  at::Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr;
  at::Tensor y, h_n, c_n, gates, cells;
  bool save = true;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    if (save) return {y, h_n, c_n, gates, cells};
    return {y, h_n, c_n, y.new_empty({0, 4 * c_n.size(1)}), y.new_empty({0, c_n.size(1)})};
  }
};
ForwardCall forward_call(const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0,
                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh,
                         const std::optional<at::Tensor>& w_hr, bool save);

// The same for the backward op: incoming gradients (undefined when absent),
// saved tensors checked against the sizes, and the gradients allocated (db
// and dw_hr empty without bias / projection).
struct BackwardCall {
  bool input_grad = true;  // else dx is [0, input] and not computed
  at::Tensor dy, dh_n, dc_n;
  at::Tensor x, h0, c0, w_ih, w_hh, w_hr, y, gates, cells;
  at::Tensor dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  outputs() const {
    return {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
  }
};
BackwardCall backward_call(const LayerSizes& s, const std::optional<at::Tensor>& grad_y,
                           const std::optional<at::Tensor>& grad_h_n,
                           const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                           const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                           bool has_bias, const at::Tensor& y, const at::Tensor& gates,
                           const at::Tensor& cells, bool input_grad = true);

// A bidirectional layer (bilayer_forward / bilayer_backward): the calls of
// its two directions (0 forward, 1 reverse) on the same x and batch_sizes,
// checked as layer calls (h0 and c0 are [2, batch, size], the gradients of
// the pair's outputs likewise stacked, y and grad_y [rows, 2P]). h_n, c_n,
// gates and cells of the directions are views of the pair's stacked tensors;
// y of each its own [rows, P], concatenated by outputs().
struct LayerWeights {
  at::Tensor w_ih, w_hh;
  std::optional<at::Tensor> b_ih, b_hh, w_hr;
};
struct BiForwardCall {
  std::array<LayerSizes, 2> sizes;
  std::array<ForwardCall, 2> dir;
  at::Tensor h_n, c_n, gates, cells;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const;
};
BiForwardCall bi_forward_call(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              const std::array<LayerWeights, 2>& w,
                              const std::optional<at::Tensor>& batch_sizes, bool save);

// The directions' gradients; outputs() adds their dx and stacks dh0, dc0.
struct BiBackwardCall {
  std::array<LayerSizes, 2> sizes;
  std::array<BackwardCall, 2> dir;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  outputs() const;
};
BiBackwardCall bi_backward_call(const std::optional<at::Tensor>& grad_y,
                                const std::optional<at::Tensor>& grad_h_n,
                                const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                                const at::Tensor& h0, const at::Tensor& c0,
                                const std::array<LayerWeights, 2>& w,
                                const std::optional<at::Tensor>& batch_sizes, bool has_bias,
                                const at::Tensor& y, const at::Tensor& gates,
                                const at::Tensor& cells);

}  // namespace lstm_fused
