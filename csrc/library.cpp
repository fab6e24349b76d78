// The op schemas: one registration layer for every device. The device
// implementations register under them (cpu/lstm_cpu_ops.cpp,
// cuda/lstm_cuda_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY(lstm_fused, m) {
  // One layer, one direction, the whole (packed) sequence. x is [rows, I];
  // without batch_sizes the rows are T steps of the batch of h0.
  // Returns y, h_n, c_n and the gate activations and cells saved for backward
  // (both with 0 rows when save is false: an inference call keeps nothing).
  m.def(
      "layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "bool save=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns dx ([0, input] with input_grad false: not computed), dh0, dc0,
  // dw_ih, dw_hh, db (empty without bias; the gradient of b_ih and b_hh
  // alike) and dw_hr (empty without projection).
  m.def(
      "layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, bool has_bias, Tensor y, Tensor gates, Tensor cells, "
      "bool input_grad=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Both directions of a bidirectional layer in one call (on CUDA, one
  // persistent launch where both fit): the same as layer_forward on the
  // first five weights and layer_forward with reverse on the other five.
  // h0, c0 are [2, batch, size]; returns y [rows, 2 * P] (the directions
  // concatenated, as the layer's output), h_n and c_n [2, batch, size], and
  // gates and cells stacked [2, rows or 0, size].
  m.def(
      "bilayer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor w_ih_reverse, Tensor w_hh_reverse, "
      "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? batch_sizes, "
      "bool save=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its gradient: dx (both directions'), dh0, dc0 [2, batch, size], then
  // dw_ih, dw_hh, db, dw_hr of each direction as layer_backward gives them.
  m.def(
      "bilayer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor w_ih_reverse, "
      "Tensor w_hh_reverse, Tensor? w_hr_reverse, Tensor? batch_sizes, bool has_bias, "
      "Tensor y, Tensor gates, Tensor cells) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  // What the CUDA implementation runs for a layer of these sizes on the
  // current device (both directions in one launch with directions=2):
  // [persistent (1) or per-step (0), directions per launch, blocks, hidden
  // units per block, projection columns per block, bytes of shared memory
  // per block], for the forward then the backward. (The bench shows it.)
  m.def(
      "cuda_plan(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor? batch_sizes, int directions=1) -> int[]");
}
