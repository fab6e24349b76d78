// The argument checks and call prologues shared by the CPU and CUDA
// implementations (the schemas are in library.cpp).
#include "ops.h"

#include <ATen/ATen.h>

#include <climits>

namespace lstm_fused {
namespace {

void check_param(const at::Tensor& p, const at::Tensor& x, const char* name,
                 at::IntArrayRef shape) {
  TORCH_CHECK(p.sizes() == shape, "lstm_fused: ", name, " must have shape ",
              shape, ", got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), "lstm_fused: ", name,
              " must have dtype ", x.scalar_type(), " like the input, got ",
              p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), "lstm_fused: ", name,
              " must be on the input's device ", x.device(), ", got ", p.device());
}

}  // namespace

LayerSizes check_layer_args(const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(x.dim() == 2, "lstm_fused: x must be 2-D [rows, input_size], got ",
              x.dim(), "-D");
  TORCH_CHECK(h0.dim() == 2 && c0.dim() == 2,
              "lstm_fused: h0 and c0 must be 2-D [batch, size], got ", h0.dim(),
              "-D and ", c0.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "lstm_fused: w_ih must be [4*hidden_size, input_size], got ", w_ih.sizes());
  TORCH_CHECK(!w_hr.has_value() || w_hr->dim() == 2,
              "lstm_fused: w_hr must be [proj_size, hidden_size], got ", w_hr->sizes());
  LayerSizes s;
  s.rows = x.size(0);
  s.input = x.size(1);
  s.hidden = w_ih.size(0) / 4;
  s.batch = h0.size(0);
  s.proj = w_hr.has_value() ? w_hr->size(0) : s.hidden;
  const int64_t G = 4 * s.hidden;
  check_param(w_ih, x, "w_ih", {G, s.input});
  check_param(w_hh, x, "w_hh", {G, s.proj});
  check_param(h0, x, "h0", {s.batch, s.proj});
  check_param(c0, x, "c0", {s.batch, s.hidden});
  if (b_ih) check_param(*b_ih, x, "b_ih", {G});
  if (b_hh) check_param(*b_hh, x, "b_hh", {G});
  if (w_hr) check_param(*w_hr, x, "w_hr", {s.proj, s.hidden});
  TORCH_CHECK(s.batch > 0, "lstm_fused: batch size must be positive");
  // The BLAS and the kernels index one matrix dimension with 32 bits. Checked
  // before anything of a size taken from the arguments is allocated.
  for (int64_t v : {s.rows, s.input, G, s.proj})
    TORCH_CHECK(v < INT_MAX, "lstm_fused: a dimension of ", v,
                " is too large (limit 2^31 - 1)");

  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "lstm_fused: batch_sizes must be a 1-D int64 CPU tensor");
    TORCH_CHECK(bs.numel() <= s.rows, "lstm_fused: batch_sizes has ", bs.numel(),
                " steps but x only ", s.rows, " rows");
    const at::Tensor bc = bs.contiguous();
    s.batch_sizes.assign(bc.data_ptr<int64_t>(), bc.data_ptr<int64_t>() + bc.numel());
    s.steps = bc.numel();
    TORCH_CHECK(s.steps > 0, "lstm_fused: batch_sizes must not be empty");
    TORCH_CHECK(s.batch_sizes[0] == s.batch, "lstm_fused: batch_sizes[0] (",
                s.batch_sizes[0], ") must equal the batch of h0 (", s.batch, ")");
    int64_t total = 0, prev = s.batch;
    for (int64_t b : s.batch_sizes) {
      TORCH_CHECK(b > 0 && b <= prev,
                  "lstm_fused: batch_sizes must be positive and non-increasing");
      total += b;
      prev = b;
    }
    TORCH_CHECK(total == s.rows, "lstm_fused: batch_sizes sum to ", total,
                " but x has ", s.rows, " rows");
  } else {
    TORCH_CHECK(s.rows > 0 && s.rows % s.batch == 0, "lstm_fused: x has ", s.rows,
                " rows, not a positive multiple of the batch size ", s.batch);
    s.steps = s.rows / s.batch;
    s.batch_sizes.assign(s.steps, s.batch);
  }
  return s;
}

at::Tensor check_like(const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                      const at::Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == shape, "lstm_fused: ", name, " must have shape ", shape,
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == like.scalar_type() && t->device() == like.device(),
              "lstm_fused: ", name, " must have the dtype and device of the input");
  return t->contiguous();
}

namespace {
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}
}  // namespace

ForwardCall forward_call(const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0,
                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh,
                         const std::optional<at::Tensor>& w_hr, bool save) {
  ForwardCall c;
  c.save = save;
  c.x = x.contiguous();
  c.h0 = h0.contiguous();
  c.c0 = c0.contiguous();
  c.w_ih = w_ih.contiguous();
  c.w_hh = w_hh.contiguous();
  c.b_ih = contiguous_or_undefined(b_ih);
  c.b_hh = contiguous_or_undefined(b_hh);
  c.w_hr = contiguous_or_undefined(w_hr);
  c.y = x.new_empty({s.rows, s.proj});
  c.h_n = x.new_empty({s.batch, s.proj});
  c.c_n = x.new_empty({s.batch, s.hidden});
  if (save) {
    c.gates = x.new_empty({s.rows, 4 * s.hidden});
    c.cells = x.new_empty({s.rows, s.hidden});
  }
  return c;
}

BackwardCall backward_call(const LayerSizes& s, const std::optional<at::Tensor>& grad_y,
                           const std::optional<at::Tensor>& grad_h_n,
                           const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                           const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                           bool has_bias, const at::Tensor& y, const at::Tensor& gates,
                           const at::Tensor& cells, bool input_grad) {
  BackwardCall c;
  c.input_grad = input_grad;
  c.x = x.contiguous();
  c.h0 = h0.contiguous();
  c.c0 = c0.contiguous();
  c.w_ih = w_ih.contiguous();
  c.w_hh = w_hh.contiguous();
  c.w_hr = contiguous_or_undefined(w_hr);
  c.y = check_like(y, {s.rows, s.proj}, x, "y");
  c.gates = check_like(gates, {s.rows, 4 * s.hidden}, x, "gates");
  c.cells = check_like(cells, {s.rows, s.hidden}, x, "cells");
  c.dy = check_like(grad_y, {s.rows, s.proj}, x, "grad_y");
  c.dh_n = check_like(grad_h_n, {s.batch, s.proj}, x, "grad_h_n");
  c.dc_n = check_like(grad_c_n, {s.batch, s.hidden}, x, "grad_c_n");
  c.dx = input_grad ? at::empty_like(c.x) : x.new_empty({0, s.input});
  c.dh0 = at::empty_like(c.h0);
  c.dc0 = at::empty_like(c.c0);
  c.dw_ih = at::empty_like(c.w_ih);
  c.dw_hh = at::empty_like(c.w_hh);
  c.db = x.new_empty({has_bias ? 4 * s.hidden : 0});
  c.dw_hr = c.w_hr.defined() ? at::empty_like(c.w_hr) : x.new_empty({0});
  return c;
}

namespace {

// h0 or c0 of a pair, or a gradient of its h_n, c_n: [2, batch, size].
void check_pair(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == 2, "lstm_fused: ", name,
              " of a bidirectional layer must be [2, batch, size], got ", t.sizes());
}

std::optional<at::Tensor> direction(const std::optional<at::Tensor>& t, int d) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->select(0, d);
}

}  // namespace

BiForwardCall bi_forward_call(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              const std::array<LayerWeights, 2>& w,
                              const std::optional<at::Tensor>& batch_sizes, bool save) {
  check_pair(h0, "h0");
  check_pair(c0, "c0");
  BiForwardCall c;
  for (int d = 0; d < 2; ++d)
    c.sizes[d] = check_layer_args(x, h0[d], c0[d], w[d].w_ih, w[d].w_hh, w[d].b_ih,
                                  w[d].b_hh, w[d].w_hr, batch_sizes);
  const LayerSizes& s = c.sizes[0];
  TORCH_CHECK(c.sizes[1].hidden == s.hidden && c.sizes[1].proj == s.proj,
              "lstm_fused: the directions of a bidirectional layer must have the same sizes");
  c.h_n = x.new_empty({2, s.batch, s.proj});
  c.c_n = x.new_empty({2, s.batch, s.hidden});
  c.gates = x.new_empty({2, save ? s.rows : 0, 4 * s.hidden});
  c.cells = x.new_empty({2, save ? s.rows : 0, s.hidden});
  for (int d = 0; d < 2; ++d) {
    ForwardCall& f = c.dir[d];
    f.save = save;
    f.x = x.contiguous();
    f.h0 = h0[d].contiguous();
    f.c0 = c0[d].contiguous();
    f.w_ih = w[d].w_ih.contiguous();
    f.w_hh = w[d].w_hh.contiguous();
    f.b_ih = contiguous_or_undefined(w[d].b_ih);
    f.b_hh = contiguous_or_undefined(w[d].b_hh);
    f.w_hr = contiguous_or_undefined(w[d].w_hr);
    f.y = x.new_empty({s.rows, s.proj});
    f.h_n = c.h_n[d];
    f.c_n = c.c_n[d];
    if (save) {
      f.gates = c.gates[d];
      f.cells = c.cells[d];
    }
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> BiForwardCall::outputs()
    const {
  return {at::cat({dir[0].y, dir[1].y}, 1), h_n, c_n, gates, cells};
}

BiBackwardCall bi_backward_call(const std::optional<at::Tensor>& grad_y,
                                const std::optional<at::Tensor>& grad_h_n,
                                const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                                const at::Tensor& h0, const at::Tensor& c0,
                                const std::array<LayerWeights, 2>& w,
                                const std::optional<at::Tensor>& batch_sizes, bool has_bias,
                                const at::Tensor& y, const at::Tensor& gates,
                                const at::Tensor& cells) {
  check_pair(h0, "h0");
  check_pair(c0, "c0");
  check_pair(gates, "gates");
  check_pair(cells, "cells");
  if (grad_h_n.has_value() && grad_h_n->defined()) check_pair(*grad_h_n, "grad_h_n");
  if (grad_c_n.has_value() && grad_c_n->defined()) check_pair(*grad_c_n, "grad_c_n");
  BiBackwardCall c;
  for (int d = 0; d < 2; ++d)
    c.sizes[d] = check_layer_args(x, h0[d], c0[d], w[d].w_ih, w[d].w_hh, std::nullopt,
                                  std::nullopt, w[d].w_hr, batch_sizes);
  const LayerSizes& s = c.sizes[0];
  TORCH_CHECK(c.sizes[1].hidden == s.hidden && c.sizes[1].proj == s.proj,
              "lstm_fused: the directions of a bidirectional layer must have the same sizes");
  TORCH_CHECK(y.dim() == 2 && y.size(1) == 2 * s.proj, "lstm_fused: y must have shape [",
              s.rows, ", ", 2 * s.proj, "], got ", y.sizes());
  const bool dy = grad_y.has_value() && grad_y->defined();
  TORCH_CHECK(!dy || (grad_y->dim() == 2 && grad_y->size(1) == 2 * s.proj),
              "lstm_fused: grad_y must have shape [", s.rows, ", ", 2 * s.proj, "], got ",
              grad_y->sizes());
  for (int d = 0; d < 2; ++d) {
    const std::optional<at::Tensor> dy_d =
        dy ? std::optional<at::Tensor>(grad_y->narrow(1, d * s.proj, s.proj)) : std::nullopt;
    c.dir[d] = backward_call(c.sizes[d], dy_d, direction(grad_h_n, d), direction(grad_c_n, d),
                             x, h0[d], c0[d], w[d].w_ih, w[d].w_hh, w[d].w_hr, has_bias,
                             y.narrow(1, d * s.proj, s.proj), gates[d], cells[d]);
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
BiBackwardCall::outputs() const {
  const BackwardCall &f = dir[0], &r = dir[1];
  return {f.dx + r.dx,          at::stack({f.dh0, r.dh0}), at::stack({f.dc0, r.dc0}),
          f.dw_ih, f.dw_hh, f.db, f.dw_hr, r.dw_ih, r.dw_hh, r.db, r.dw_hr};
}

}  // namespace lstm_fused
