"""The registered ops, their fake (meta) implementations and their autograd.

`torch.ops.lstm_fused.layer_forward` runs one layer in one direction over a
whole (packed) sequence; `layer_backward` is its gradient. `bilayer_forward`
and `bilayer_backward` do the same for both directions of a bidirectional
layer at once (on CUDA one persistent launch). All are defined in C++
(csrc/library.cpp) with CPU and CUDA implementations; this file adds what
torch.compile/export and autograd need, and `layer` and `bilayer`, the
differentiable calls the module uses.
"""
import sys

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (registers the ops)
from . import reference

_ops = torch.ops.lstm_fused
_forward = _ops.layer_forward.default
_bi_forward = _ops.bilayer_forward.default


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
                         batch_sizes, reverse, has_bias, y, gates, cells, input_grad=True):
    _check_devices(x, (grad_y, grad_h_n, grad_c_n, h0, c0, w_ih, w_hh, w_hr, y, gates, cells),
                   batch_sizes)
    hidden = c0.shape[1]
    return (torch.empty_like(x) if input_grad else x.new_empty(0, x.shape[1]),
            torch.empty_like(h0), torch.empty_like(c0),
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
    # No zeros for the gradients no one gave (the saved gates' and cells' are
    # tens of MB): the ops take None.
    ctx.set_materialize_grads(False)


def _zeros_for_none(grads, like):
    """The output gradients with zeros for those not given, for the
    differentiable (plain torch) backward, which takes no None."""
    return tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like))


def _backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    *inputs, y, gates, cells = ctx.saved_tensors
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes = inputs
    grads = (grad_y, grad_h_n, grad_c_n)
    if torch.is_grad_enabled():
        # create_graph=True, or torch.func (whose grad and vjp always run
        # backward so): the same op, its result differentiable.
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _Backward.apply(
            *_zeros_for_none(grads, (y, h0, c0)), *inputs, ctx.reverse, y, gates, cells)
    else:
        # An input that needs no gradient (features, frozen embeddings): no dx
        # product (a quarter of the backward's work).
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _ops.layer_backward(
            *grads, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse, any(ctx.bias),
            y, gates, cells, ctx.needs_input_grad[0])
        dx = dx if ctx.needs_input_grad[0] else None
    return (dx, dh0, dc0, dw_ih, dw_hh,
            db if ctx.bias[0] else None, db if ctx.bias[1] else None,
            dw_hr if w_hr is not None else None, None, None, None)


torch.library.register_autograd(
    "lstm_fused::layer_forward", _backward, setup_context=_setup_context)


# Both directions of a bidirectional layer in one op (on CUDA one persistent
# launch): the same as layer_forward per direction, h0/c0 and the states
# stacked [2, batch, size], y the directions concatenated.

def _directions(weights):
    """The ten weight arguments of the bilayer ops as two layers' five."""
    return weights[:5], weights[5:]


@torch.library.register_fake("lstm_fused::bilayer_forward")
def _bilayer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r,
                          b_hh_r, w_hr_r, batch_sizes, save=True):
    _check_devices(x, (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                       w_hr_r), batch_sizes)
    torch._check(h0.dim() == 3 and h0.shape[0] == 2 and c0.dim() == 3 and c0.shape[0] == 2,
                 lambda: "lstm_fused: h0 and c0 of a bidirectional layer must be [2, batch, size]")
    rows, hidden, proj = x.shape[0], c0.shape[2], h0.shape[2]
    kept = rows if save else 0
    return (x.new_empty(rows, 2 * proj), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            x.new_empty(2, kept, 4 * hidden), x.new_empty(2, kept, hidden))


@torch.library.register_fake("lstm_fused::bilayer_backward")
def _bilayer_backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                           w_ih_r, w_hh_r, w_hr_r, batch_sizes, has_bias, y, gates, cells):
    _check_devices(x, (grad_y, grad_h_n, grad_c_n, h0, c0, w_ih, w_hh, w_hr, w_ih_r, w_hh_r,
                       w_hr_r, y, gates, cells), batch_sizes)
    hidden = c0.shape[2]

    def grads(w_ih, w_hh, w_hr):
        return (torch.empty_like(w_ih), torch.empty_like(w_hh),
                x.new_empty(4 * hidden if has_bias else 0),
                torch.empty_like(w_hr) if w_hr is not None else x.new_empty(0))
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            *grads(w_ih, w_hh, w_hr), *grads(w_ih_r, w_hh_r, w_hr_r))


def _bi_setup_context(ctx, inputs, output):
    x, h0, c0, *weights = inputs[:13]
    y, _, _, gates, cells = output
    ctx.save_for_backward(x, h0, c0, *weights, inputs[13], y, gates, cells)
    ctx.bias = [(w[2] is not None, w[3] is not None) for w in _directions(weights)]
    ctx.mark_non_differentiable(gates, cells)
    ctx.set_materialize_grads(False)


def _bi_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    x, h0, c0, *rest = ctx.saved_tensors
    weights, batch_sizes, (y, gates, cells) = rest[:10], rest[10], rest[11:]
    directions = _directions(weights)
    has_bias = any(ctx.bias[0])
    if torch.is_grad_enabled():
        # create_graph=True: each direction through layer_backward's
        # differentiable form (_Backward), as layer_forward's backward does.
        proj = h0.shape[2]
        grad_y, grad_h_n, grad_c_n = _zeros_for_none((grad_y, grad_h_n, grad_c_n), (y, h0, c0))

        def part(t, d, cols=False):
            return t[:, d * proj:(d + 1) * proj] if cols else t[d]
        results = [_Backward.apply(part(grad_y, d, True), part(grad_h_n, d), part(grad_c_n, d),
                                   x, h0[d], c0[d], *w, batch_sizes, d == 1,
                                   part(y, d, True), gates[d], cells[d])
                   for d, w in enumerate(directions)]
        dx = results[0][0] + results[1][0]
        dh0 = torch.stack([r[1] for r in results])
        dc0 = torch.stack([r[2] for r in results])
        per_direction = [r[3:] for r in results]
    else:
        dx, dh0, dc0, *flat = _ops.bilayer_backward(
            grad_y, grad_h_n, grad_c_n, x, h0, c0, *directions[0][:2], directions[0][4],
            *directions[1][:2], directions[1][4], batch_sizes, has_bias, y, gates, cells)
        per_direction = [flat[:4], flat[4:]]
    grads = [dx, dh0, dc0]
    for (dw_ih, dw_hh, db, dw_hr), w, bias in zip(per_direction, directions, ctx.bias):
        grads += [dw_ih, dw_hh, db if bias[0] else None, db if bias[1] else None,
                  dw_hr if w[4] is not None else None]
    return (*grads, None, None)


torch.library.register_autograd(
    "lstm_fused::bilayer_forward", _bi_backward, setup_context=_bi_setup_context)


def _vmap_loop(op, info, in_dims, *args):
    """op over vmap's dimension: one call per entry, the results stacked."""
    def entry(n):
        return [a.select(d, n) if d is not None else a for a, d in zip(args, in_dims)]
    results = [op(*entry(n)) for n in range(info.batch_size)]
    return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])


@torch.library.register_vmap("lstm_fused::layer_forward")
def _layer_forward_vmap(info, in_dims, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                        reverse, save=True):
    """vmap of padded input under shared weights folds vmap's dimension into
    the batch: one call. Anything else (packed, per-entry weights) loops."""
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, save)
    n = info.batch_size
    x, h0, c0 = (t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)
                 for t, d in zip((x, h0, c0), in_dims))
    batch = h0.shape[1]
    if batch_sizes is not None or any(d is not None for d in in_dims[3:8]) or batch == 0:
        return _vmap_loop(_forward, info, in_dims, *args)
    steps = x.shape[1] // batch

    def fold(t):  # [n, steps * batch, w] -> [steps * n * batch, w], step-major
        return t.reshape(n, steps, batch, -1).transpose(0, 1).reshape(steps * n * batch, -1)

    def unfold(t):
        return t.view(steps, n, batch, -1).transpose(0, 1).reshape(n, steps * batch, -1)
    y, h_n, c_n, gates, cells = _forward(
        fold(x), h0.reshape(n * batch, -1), c0.reshape(n * batch, -1),
        w_ih, w_hh, b_ih, b_hh, w_hr, None, reverse, save)
    saved = (unfold(gates), unfold(cells)) if save else (gates, cells)  # none kept: [0, w]
    return ((unfold(y), h_n.view(n, batch, -1), c_n.view(n, batch, -1), *saved),
            (0, 0, 0) + ((0, 0) if save else (None, None)))


@torch.library.register_vmap("lstm_fused::layer_backward")
def _layer_backward_vmap(info, in_dims, *args):
    """The weight gradients differ per entry (per-sample gradients): one
    call per entry."""
    return _vmap_loop(_ops.layer_backward.default, info, in_dims, *args)


# Derivatives of derivatives, and forward mode: of the same functions
# written in plain torch ops (reference.layer and its vjp), by torch.func,
# which composes with its own transforms (autograd.grad does not: their
# backward may run after their level has ended).

def _partial(f, args, which):
    """f as a function of args[i] for i in which, the other args fixed."""
    def f_of(*values):
        full = list(args)
        for i, v in zip(which, values):
            full[i] = v
        return f(*full)
    return f_of


def _reference_layer(batch_sizes, reverse):
    return lambda *inputs: reference.layer(*inputs, batch_sizes=batch_sizes, reverse=reverse)


def _backward_results(inputs):
    """Which of the 8 layer inputs layer_backward's 7 results are the
    gradients of (its one bias gradient is b_ih's and b_hh's), and which of
    the 7 are there."""
    has_bias, has_proj = inputs[5] is not None or inputs[6] is not None, inputs[7] is not None
    grads_of = [0, 1, 2, 3, 4] + ([5 if inputs[5] is not None else 6] if has_bias else [])
    return grads_of + ([7] if has_proj else []), [True] * 5 + [has_bias, has_proj]


def _reference_backward(batch_sizes, reverse):
    """(grad_y, grad_h_n, grad_c_n, *8 layer inputs) -> what layer_backward
    gives, less the absent bias and projection gradients, in plain torch ops."""
    def backward(*args):
        grads, inputs = args[:3], args[3:]
        grads_of, _ = _backward_results(inputs)
        _, pullback = torch.func.vjp(
            _partial(_reference_layer(batch_sizes, reverse), inputs, grads_of),
            *(inputs[i] for i in grads_of))
        return pullback(tuple(grads))
    return backward


def _vjp(f, args, needs, cotangents, total):
    """Gradients of <f(args), cotangents> for the args that need them."""
    wanted = [i for i, need in enumerate(needs) if need]
    outputs, pullback = torch.func.vjp(_partial(f, args, wanted), *(args[i] for i in wanted))
    found = pullback(tuple(c if c is not None else torch.zeros_like(o)
                           for o, c in zip(outputs, cotangents)))
    result = [None] * total
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


def _jvp(f, args, tangents):
    """J t as the vjp of the vjp (linear in its cotangent): reverse mode only,
    so it also runs inside forward-mode AD, which does not nest."""
    given = [i for i, t in enumerate(tangents) if t is not None]
    outputs, pullback = torch.func.vjp(_partial(f, args, given), *(args[i] for i in given))
    _, pullback_of_pullback = torch.func.vjp(
        pullback, tuple(torch.zeros_like(o) for o in outputs))
    (out,) = pullback_of_pullback(tuple(tangents[i] for i in given))
    return out


class _Layer(torch.autograd.Function):
    """layer_forward and the autograd above as an autograd.Function, the form
    torch.func's transforms take (they refuse the function register_autograd
    makes, torch 2.13). vmap runs the ops' batching rules."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:8])
        ctx.batch_sizes = inputs[8]

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, *tangents):
        f = _reference_layer(ctx.batch_sizes, ctx.reverse)
        return (*_jvp(f, ctx.saved_tensors, tangents[:8]), None, None)


class _Backward(torch.autograd.Function):
    """layer_backward as a differentiable function of the output gradients
    and the layer's inputs: the values from the fused op, their derivatives
    from _reference_backward."""
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                batch_sizes, reverse, y, gates, cells):
        return _ops.layer_backward(
            grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse,
            b_ih is not None or b_hh is not None, y, gates, cells)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:11])
        ctx.save_for_forward(*inputs[:11])
        ctx.batch_sizes, ctx.reverse = inputs[11], inputs[12]

    @staticmethod
    def backward(ctx, *cotangents):
        args = ctx.saved_tensors
        _, present = _backward_results(args[3:])
        return _vjp(_reference_backward(ctx.batch_sizes, ctx.reverse), args,
                    ctx.needs_input_grad[:11],
                    [c for c, there in zip(cotangents, present) if there], 16)

    @staticmethod
    def jvp(ctx, *tangents):
        args = ctx.saved_tensors
        _, present = _backward_results(args[3:])
        out = iter(_jvp(_reference_backward(ctx.batch_sizes, ctx.reverse), args, tangents[:11]))
        empty = args[3].new_zeros(0)  # the tangent of an absent (empty) result
        return tuple(next(out) if there else empty for there in present)


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


def _transformed():
    """Under torch.func's transforms (grad, vmap, jvp...) or forward-mode AD."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
          reverse=False):
    """One LSTM layer in one direction: returns (y, h_n, c_n).

    x is [rows, input_size]: T steps of the batch of h0 one after another, or,
    with `batch_sizes` (int64 CPU tensor, as in PackedSequence), packed rows.
    """
    if export_mode() == "onnx":
        return _onnx_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if not torch.compiler.is_compiling() and _transformed():
        y, h_n, c_n, _, _ = _Layer.apply(*args, torch.is_grad_enabled())
    elif not torch.is_grad_enabled():
        # Inference keeps nothing for backward.
        if torch.compiler.is_compiling():
            y, h_n, c_n, _, _ = _forward(*args, False)
        else:
            # Straight to the device kernel, past the Python autograd wrapper
            # (about half of a short call's host time).
            with torch._C._AutoDispatchBelowAutograd():
                y, h_n, c_n, _, _ = _forward(*args, False)
    else:
        y, h_n, c_n, _, _ = _forward(*args)
    return y, h_n, c_n


# The devices whose bidirectional layers run both directions in one call
# (bilayer_forward): CUDA, where that is one persistent launch. (The
# emulation of CUDA adds "cpu"; elsewhere the directions run one by one.)
PAIR_DEVICES = {"cuda"}


def pairs(x):
    """Whether a bidirectional layer on x runs as one bilayer call: on the
    devices above, in eager autograd or inference (torch.func, forward-mode
    AD, compile and export run the directions as layers)."""
    return (x.device.type in PAIR_DEVICES and export_mode() is None
            and not torch.compiler.is_compiling() and not _transformed())


def bilayer(x, h0, c0, forward_weights, reverse_weights, batch_sizes=None):
    """Both directions of a bidirectional layer: returns (y, h_n, c_n), y
    [rows, 2 * P] (the directions concatenated), h_n and c_n [2, batch, size]
    from h0, c0 [2, batch, size]. forward_weights, reverse_weights: each
    (w_ih, w_hh, b_ih, b_hh, w_hr) as `layer` takes them."""
    args = (x, h0, c0, *forward_weights, *reverse_weights, batch_sizes)
    if not torch.is_grad_enabled():
        with torch._C._AutoDispatchBelowAutograd():
            y, h_n, c_n, _, _ = _bi_forward(*args, False)
    else:
        y, h_n, c_n, _, _ = _bi_forward(*args)
    return y, h_n, c_n


def cuda_plan(module, input):
    """Which CUDA kernels lstm_fused.LSTM `module` runs on `input` (batched
    or unbatched, not packed) on its CUDA device, forward and backward: e.g.
    {"forward": "persistent: 96 blocks x 8 units, 97 KB shared memory per
    block", "backward": ...}; for a bidirectional module "persistent: 2
    directions x 64 blocks x 8 units, ..." where both directions share one
    launch (else each runs on its own, as a unidirectional layer); or
    "per-step" where the persistent kernels do not apply (float64, one step,
    weights too large for shared memory, ...; LSTM_FUSED_CUDA_ENGINE=step|
    persistent forces either). Every layer of a module runs the same kernels."""
    x = input if input.dim() == 3 else input.unsqueeze(1)
    if module.batch_first and input.dim() == 3:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    proj = module.proj_size or module.hidden_size
    w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0
    h0 = x.new_zeros(batch, proj)
    c0 = x.new_zeros(batch, module.hidden_size)
    w_hr = getattr(module, "weight_hr_l0", None)
    plan = _ops.cuda_plan(x.reshape(steps * batch, -1), h0, c0, w_ih, w_hh, w_hr, None,
                          2 if module.bidirectional else 1)

    def describe(p):
        persistent, directions, blocks, units, proj_units, shared = p
        if not persistent:
            return "per-step"
        cols = f", {proj_units} projection columns" if w_hr is not None else ""
        grid = (f"{directions} directions x {blocks // directions} blocks" if directions > 1
                else f"{blocks} blocks")
        return (f"persistent: {grid} x {units} units{cols}, "
                f"{(shared + 1023) // 1024} KB shared memory per block")
    return {"forward": describe(plan[:6]), "backward": describe(plan[6:])}
