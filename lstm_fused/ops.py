"""The registered ops, their fake (meta) implementations and their autograd.

`torch.ops.lstm_fused.layer_forward` runs one layer in one direction over a
whole (packed) sequence; `layer_backward` is its gradient. Both are defined in
C++ (csrc/ops.cpp) with CPU and CUDA implementations; this file adds what
torch.compile/export and autograd need, and `layer`, the differentiable call
the module uses.
"""
import sys

import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (registers the ops)
from . import reference

_ops = torch.ops.lstm_fused
_forward = _ops.layer_forward.default


def _check_devices(x, tensors, batch_sizes):
    """What the device kernels check, for the fake path too: a meta tensor
    among CPU tensors dispatches here and must be refused, not traced."""
    for t in tensors:
        if t is not None:
            torch._check(t.device == x.device, lambda: (
                f"lstm_fused: every tensor must be on the input's device {x.device}, "
                f"got one on {t.device}"))
    if batch_sizes is not None and x.device.type != "meta":
        torch._check(batch_sizes.device.type == "cpu", lambda: (
            f"lstm_fused: batch_sizes must be a 1-D int64 CPU tensor, got device "
            f"{batch_sizes.device}"))


@torch.library.register_fake("lstm_fused::layer_forward")
def _layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                        save=True):
    _check_devices(x, (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), batch_sizes)
    rows, hidden, proj = x.shape[0], c0.shape[1], h0.shape[1]
    kept = rows if save else 0  # what is saved for backward
    return (x.new_empty(rows, proj), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            x.new_empty(kept, 4 * hidden), x.new_empty(kept, hidden))


@torch.library.register_fake("lstm_fused::layer_backward")
def _layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                         batch_sizes, reverse, has_bias, y, gates, cells):
    _check_devices(x, (grad_y, grad_h_n, grad_c_n, h0, c0, w_ih, w_hh, w_hr, y, gates, cells),
                   batch_sizes)
    hidden = c0.shape[1]
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(w_ih), torch.empty_like(w_hh),
            x.new_empty(4 * hidden if has_bias else 0),
            torch.empty_like(w_hr) if w_hr is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, *_ = inputs
    y, _, _, gates, cells = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                          y, gates, cells)
    ctx.reverse = reverse
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(gates, cells)


def _backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    *inputs, y, gates, cells = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a double backward may follow
        return _backward_differentiable(ctx, inputs, (grad_y, grad_h_n, grad_c_n))
    x, h0, c0, w_ih, w_hh, _, _, w_hr, batch_sizes = inputs
    has_bias = any(ctx.bias)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _ops.layer_backward(
        grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
        ctx.reverse, has_bias, y, gates, cells)
    return (dx, dh0, dc0, dw_ih, dw_hh,
            db if ctx.bias[0] else None, db if ctx.bias[1] else None,
            dw_hr if w_hr is not None else None, None, None, None)


def _backward_differentiable(ctx, inputs, grads):
    """The gradients as a differentiable function of the inputs and of
    `grads`: autograd through the layer recomputed in plain torch ops."""
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:8]) if need]
    with torch.enable_grad():
        outputs = reference.layer(*inputs, reverse=ctx.reverse)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    found = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
        create_graph=True, allow_unused=True)
    result = [None] * 11
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


torch.library.register_autograd(
    "lstm_fused::layer_forward", _backward, setup_context=_setup_context)


def export_mode():
    """"onnx" under torch.onnx.export(dynamo=True) (where our layers export
    as standard ONNX ops), "torch" under torch.jit.trace (the TorchScript
    ONNX exporter traces) or an ONNX export by a torch without torch.onnx.ops
    (< 2.8): then the modules run torch.nn's forward, whose graph is the
    standard one. Else None. No ONNX export runs unless torch.onnx was
    imported (`import torch` does not)."""
    if torch.jit.is_tracing():
        return "torch"
    onnx = sys.modules.get("torch.onnx")
    if onnx is not None and onnx.is_in_onnx_export():
        return "onnx" if hasattr(onnx, "ops") else "torch"
    return None


def _onnx_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    """The layer in standard ONNX ops for torch.onnx.export(dynamo=True), for
    any sequence length and batch: the ONNX LSTM op, written as is, or, with
    a projection (which that op lacks), an ONNX Scan over the steps. Packed
    input the modules export through nn.LSTM's graph."""
    if batch_sizes is not None:
        raise NotImplementedError("lstm_fused: ONNX export of a layer over packed input")
    batch, hidden = c0.shape
    x = x.view(-1, batch, x.shape[1])
    if w_hr is not None:
        from torch._higher_order_ops.scan import scan

        def scan_step(carry, gates_x):
            h, c = reference.step(gates_x + F.linear(carry[0], w_hh), carry[1], w_hr)
            return (h, c), h.clone()
        (h_n, c_n), y = scan(scan_step, (h0, c0), reference.input_gates(x, w_ih, b_ih, b_hh),
                             reverse=reverse)
        return y.view(-1, h_n.shape[1]), h_n, c_n

    def onnx_order(w):  # torch's gates i, f, g, o; ONNX's i, o, f, c
        i, f, g, o = w.chunk(4)
        return torch.cat([i, o, f, g])
    bias = None
    if b_ih is not None or b_hh is not None:
        bias = torch.cat([onnx_order(b) if b is not None else w_ih.new_zeros(4 * hidden)
                          for b in (b_ih, b_hh)])[None]
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM", [x, onnx_order(w_ih)[None], onnx_order(w_hh)[None], bias, None,
                 h0[None], c0[None]],
        {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"},
        dtypes=[x.dtype] * 3,
        shapes=[[x.shape[0], 1, batch, hidden], [1, batch, hidden], [1, batch, hidden]])
    return y.view(-1, hidden), h_n[0], c_n[0]


def layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
          reverse=False):
    """One LSTM layer in one direction: returns (y, h_n, c_n).

    x is [rows, input_size]: T steps of the batch of h0 one after another, or,
    with `batch_sizes` (int64 CPU tensor, as in PackedSequence), packed rows.
    """
    if export_mode() == "onnx":
        return _onnx_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if not torch.is_grad_enabled():
        # Inference keeps nothing for backward.
        args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, False)
        if torch.compiler.is_compiling():
            y, h_n, c_n, _, _ = _forward(*args)
        else:
            # Straight to the device kernel, past the Python autograd wrapper
            # (about half of a short call's host time).
            with torch._C._AutoDispatchBelowAutograd():
                y, h_n, c_n, _, _ = _forward(*args)
    else:
        y, h_n, c_n, _, _ = _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                                     reverse)
    return y, h_n, c_n
