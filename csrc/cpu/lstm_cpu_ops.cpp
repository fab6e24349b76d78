// CPU implementations of the ops: check, allocate, call the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"
#include "lstm_cpu.h"

namespace lstm_fused {
namespace {

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cpu(
    const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_,
    const std::optional<at::Tensor>& b_hh_, const std::optional<at::Tensor>& w_hr_,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const LayerSizes s =
      check_layer_args(x_, h0_, c0_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, batch_sizes);
  check_cpu_dtype(x_);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(),
                   w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_),
                   b_hh = contiguous_or_undefined(b_hh_),
                   w_hr = contiguous_or_undefined(w_hr_);
  at::Tensor y = x.new_empty({s.rows, s.proj});
  at::Tensor h_n = x.new_empty({s.batch, s.proj});
  at::Tensor c_n = x.new_empty({s.batch, s.hidden});
  at::Tensor gates = x.new_empty({s.rows, 4 * s.hidden});
  at::Tensor cells = x.new_empty({s.rows, s.hidden});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fused_layer_forward", [&] {
    cpu::ForwardArgs<scalar_t> a{
        x.data_ptr<scalar_t>(),      h0.data_ptr<scalar_t>(),    c0.data_ptr<scalar_t>(),
        w_ih.data_ptr<scalar_t>(),   w_hh.data_ptr<scalar_t>(),  ptr_or_null<scalar_t>(b_ih),
        ptr_or_null<scalar_t>(b_hh), ptr_or_null<scalar_t>(w_hr), y.data_ptr<scalar_t>(),
        h_n.data_ptr<scalar_t>(),    c_n.data_ptr<scalar_t>(),   gates.data_ptr<scalar_t>(),
        cells.data_ptr<scalar_t>()};
    cpu::layer_forward<scalar_t>(dims_of(s, reverse), a);
  });
  return {y, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cpu(const std::optional<at::Tensor>& grad_y,
                   const std::optional<at::Tensor>& grad_h_n,
                   const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x_,
                   const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_,
                   const at::Tensor& w_hh_, const std::optional<at::Tensor>& w_hr_,
                   const std::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias,
                   const at::Tensor& y_, const at::Tensor& gates_, const at::Tensor& cells_) {
  const LayerSizes s = check_layer_args(x_, h0_, c0_, w_ih_, w_hh_, std::nullopt,
                                        std::nullopt, w_hr_, batch_sizes);
  check_cpu_dtype(x_);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(),
                   w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous(),
                   w_hr = contiguous_or_undefined(w_hr_);
  const at::Tensor y = check_like(y_, {s.rows, s.proj}, x, "y");
  const at::Tensor gates = check_like(gates_, {s.rows, 4 * s.hidden}, x, "gates");
  const at::Tensor cells = check_like(cells_, {s.rows, s.hidden}, x, "cells");
  const at::Tensor dy = check_like(grad_y, {s.rows, s.proj}, x, "grad_y");
  const at::Tensor dh_n = check_like(grad_h_n, {s.batch, s.proj}, x, "grad_h_n");
  const at::Tensor dc_n = check_like(grad_c_n, {s.batch, s.hidden}, x, "grad_c_n");

  at::Tensor dx = at::empty_like(x), dh0 = at::empty_like(h0), dc0 = at::empty_like(c0);
  at::Tensor dw_ih = at::empty_like(w_ih), dw_hh = at::empty_like(w_hh);
  at::Tensor db = x.new_empty({has_bias ? 4 * s.hidden : 0});
  at::Tensor dw_hr = w_hr.defined() ? at::empty_like(w_hr) : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fused_layer_backward", [&] {
    cpu::BackwardArgs<scalar_t> a{
        ptr_or_null<scalar_t>(dy),   ptr_or_null<scalar_t>(dh_n),  ptr_or_null<scalar_t>(dc_n),
        x.data_ptr<scalar_t>(),      h0.data_ptr<scalar_t>(),      c0.data_ptr<scalar_t>(),
        w_ih.data_ptr<scalar_t>(),   w_hh.data_ptr<scalar_t>(),    ptr_or_null<scalar_t>(w_hr),
        y.data_ptr<scalar_t>(),      gates.data_ptr<scalar_t>(),   cells.data_ptr<scalar_t>(),
        dx.data_ptr<scalar_t>(),     dh0.data_ptr<scalar_t>(),     dc0.data_ptr<scalar_t>(),
        dw_ih.data_ptr<scalar_t>(),  dw_hh.data_ptr<scalar_t>(),
        has_bias ? db.data_ptr<scalar_t>() : nullptr,
        w_hr.defined() ? dw_hr.data_ptr<scalar_t>() : nullptr};
    cpu::layer_backward<scalar_t>(dims_of(s, reverse), a);
  });
  return {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("layer_forward", &lstm_fused::layer_forward_cpu);
  m.impl("layer_backward", &lstm_fused::layer_backward_cpu);
}
