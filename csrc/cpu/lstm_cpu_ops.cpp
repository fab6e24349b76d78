// CPU implementations of the ops: check, allocate, call the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"
#include "lstm_cpu.h"

namespace lstm_fused {
namespace {

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

cpu::LayerDims dims_of(const LayerSizes& s, bool reverse) {
  return {s.steps, s.batch_sizes.data(), s.rows, s.batch, s.input, s.hidden, s.proj, reverse};
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "lstm_fused: expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_fused: the CPU kernels support float32 and float64, got ",
              x.scalar_type());
}

void run_forward(const LayerSizes& s, const ForwardCall& c, bool reverse) {
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lstm_fused_layer_forward", [&] {
    cpu::ForwardArgs<scalar_t> a{
        c.x.data_ptr<scalar_t>(),      c.h0.data_ptr<scalar_t>(),
        c.c0.data_ptr<scalar_t>(),     c.w_ih.data_ptr<scalar_t>(),
        c.w_hh.data_ptr<scalar_t>(),   ptr_or_null<scalar_t>(c.b_ih),
        ptr_or_null<scalar_t>(c.b_hh), ptr_or_null<scalar_t>(c.w_hr),
        c.y.data_ptr<scalar_t>(),      c.h_n.data_ptr<scalar_t>(),
        c.c_n.data_ptr<scalar_t>(),    ptr_or_null<scalar_t>(c.gates),
        ptr_or_null<scalar_t>(c.cells)};
    cpu::layer_forward<scalar_t>(dims_of(s, reverse), a);
  });
}

void run_backward(const LayerSizes& s, const BackwardCall& c, bool reverse, bool has_bias) {
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lstm_fused_layer_backward", [&] {
    cpu::BackwardArgs<scalar_t> a{
        ptr_or_null<scalar_t>(c.dy),    ptr_or_null<scalar_t>(c.dh_n),
        ptr_or_null<scalar_t>(c.dc_n),  c.x.data_ptr<scalar_t>(),
        c.h0.data_ptr<scalar_t>(),      c.c0.data_ptr<scalar_t>(),
        c.w_ih.data_ptr<scalar_t>(),    c.w_hh.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(c.w_hr),  c.y.data_ptr<scalar_t>(),
        c.gates.data_ptr<scalar_t>(),   c.cells.data_ptr<scalar_t>(),
        c.input_grad ? c.dx.data_ptr<scalar_t>() : nullptr,
        c.dh0.data_ptr<scalar_t>(),
        c.dc0.data_ptr<scalar_t>(),     c.dw_ih.data_ptr<scalar_t>(),
        c.dw_hh.data_ptr<scalar_t>(),   has_bias ? c.db.data_ptr<scalar_t>() : nullptr,
        c.w_hr.defined() ? c.dw_hr.data_ptr<scalar_t>() : nullptr};
    cpu::layer_backward<scalar_t>(dims_of(s, reverse), a);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  const LayerSizes s = check_layer_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  check_cpu_dtype(x);
  const ForwardCall c = forward_call(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save);
  run_forward(s, c, reverse);
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cpu(const std::optional<at::Tensor>& grad_y,
                   const std::optional<at::Tensor>& grad_h_n,
                   const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                   const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                   const std::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias,
                   const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells,
                   bool input_grad) {
  const LayerSizes s = check_layer_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt,
                                        w_hr, batch_sizes);
  check_cpu_dtype(x);
  const BackwardCall c = backward_call(s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh,
                                       w_hr, has_bias, y, gates, cells, input_grad);
  run_backward(s, c, reverse, has_bias);
  return c.outputs();
}

// A bidirectional layer: its directions one after the other.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilayer_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const std::optional<at::Tensor>& b_ih_r,
    const std::optional<at::Tensor>& b_hh_r, const std::optional<at::Tensor>& w_hr_r,
    const std::optional<at::Tensor>& batch_sizes, bool save) {
  const BiForwardCall c = bi_forward_call(
      x, h0, c0,
      {LayerWeights{w_ih, w_hh, b_ih, b_hh, w_hr}, {w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r}},
      batch_sizes, save);
  check_cpu_dtype(x);
  for (int d = 0; d < 2; ++d) run_forward(c.sizes[d], c.dir[d], d == 1);
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bilayer_backward_cpu(const std::optional<at::Tensor>& grad_y,
                     const std::optional<at::Tensor>& grad_h_n,
                     const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                     const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                     const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                     const std::optional<at::Tensor>& w_hr_r,
                     const std::optional<at::Tensor>& batch_sizes, bool has_bias,
                     const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells) {
  const BiBackwardCall c = bi_backward_call(
      grad_y, grad_h_n, grad_c_n, x, h0, c0,
      {LayerWeights{w_ih, w_hh, std::nullopt, std::nullopt, w_hr},
       {w_ih_r, w_hh_r, std::nullopt, std::nullopt, w_hr_r}},
      batch_sizes, has_bias, y, gates, cells);
  check_cpu_dtype(x);
  for (int d = 0; d < 2; ++d) run_backward(c.sizes[d], c.dir[d], d == 1, has_bias);
  return c.outputs();
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("layer_forward", &lstm_fused::layer_forward_cpu);
  m.impl("layer_backward", &lstm_fused::layer_backward_cpu);
  m.impl("bilayer_forward", &lstm_fused::bilayer_forward_cpu);
  m.impl("bilayer_backward", &lstm_fused::bilayer_backward_cpu);
}
