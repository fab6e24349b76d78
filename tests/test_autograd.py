"""Autograd of the ops: gradcheck and gradgradcheck in float64 (the double
backward differentiates lstm_fused.reference), torch.library.opcheck, backward
in eval mode, and bitwise identical results run to run."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import ops, reference
from helpers import PARTS, compare, num_threads, pair, run, run_packed

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))]

# (name, proj_size, bias, batch_sizes or None, reverse)
LAYERS = [
    ("plain", 0, True, None, False),
    ("reverse-proj", 2, True, None, True),
    ("packed", 0, True, [3, 2, 2, 1], False),
    ("packed-reverse-proj-nobias", 2, False, [3, 3, 1], True),
]


def layer_args(proj, bias, batch_sizes, device="cpu", batch=3, steps=3, input=2, hidden=3,
               requires_grad=True, seed=0):
    """(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), batch_sizes, in float64."""
    g = torch.Generator().manual_seed(seed)
    width = proj or hidden

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_(
            requires_grad)

    rows = sum(batch_sizes) if batch_sizes else steps * batch
    args = (t(rows, input), t(batch, width), t(batch, hidden), t(4 * hidden, input),
            t(4 * hidden, width), t(4 * hidden) if bias else None,
            t(4 * hidden) if bias else None, t(proj, hidden) if proj else None)
    return args, (torch.tensor(batch_sizes) if batch_sizes else None)


def as_function(args, batch_sizes, reverse):
    """The layer as a function of the tensors among args (for gradcheck)."""
    present = [a for a in args if a is not None]

    def f(*tensors):
        it = iter(tensors)
        full = [next(it) if a is not None else None for a in args]
        return ops.layer(*full, batch_sizes=batch_sizes, reverse=reverse)
    return f, present


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,proj,bias,batch_sizes,reverse", LAYERS, ids=[c[0] for c in LAYERS])
def test_gradcheck_layer(name, proj, bias, batch_sizes, reverse, device):
    args, bs = layer_args(proj, bias, batch_sizes, device)
    f, inputs = as_function(args, bs, reverse)
    assert gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,proj,bias,batch_sizes,reverse", LAYERS, ids=[c[0] for c in LAYERS])
def test_gradgradcheck_layer(name, proj, bias, batch_sizes, reverse, device):
    args, bs = layer_args(proj, bias, batch_sizes, device)
    f, inputs = as_function(args, bs, reverse)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("name,proj,bias,batch_sizes,reverse", LAYERS, ids=[c[0] for c in LAYERS])
def test_reference_matches_op(name, proj, bias, batch_sizes, reverse):
    args, bs = layer_args(proj, bias, batch_sizes, requires_grad=False)
    for a, b in zip(ops.layer(*args, batch_sizes=bs, reverse=reverse),
                    reference.layer(*args, batch_sizes=bs, reverse=reverse)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg,packed", [(dict(num_layers=2, bidirectional=True), False),
                                        (dict(proj_size=2, bidirectional=True), True)],
                         ids=["deep", "proj-packed"])
def test_gradgradcheck_module(cfg, packed):
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(2, 3, dtype=torch.float64, **cfg)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    weights = tuple(lstm.parameters())
    names = [n for n, _ in lstm.named_parameters()]

    def f(x, *w):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, w)), (
            pack_padded_sequence(x, [3, 2]) if packed else x,))
        return (out.data if packed else out), h, c

    assert gradgradcheck(f, (x, *weights), fast_mode=True)


def test_gradient_penalty_matches_nn_lstm():
    """A loss on the gradient's norm trains the same as with nn.LSTM."""
    ref, ours = pair(3, 4, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out, _ = m(xi)
        (dx,) = torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)
        dx.pow(2).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("part", PARTS, ids=list(PARTS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("order", ["first", "double"])
def test_loss_on_part_of_the_outputs(part, bidirectional, order):
    """double: create_graph=True, zeros standing in for the absent output
    gradients in the differentiable backward."""
    ref, ours = pair(3, 4, torch.float64, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    found = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out, (h, c) = m(xi)
        grads = torch.autograd.grad(PARTS[part](out, h, c), [xi, *m.parameters()],
                                    create_graph=order == "double")
        if order == "double":
            grads = torch.autograd.grad(grads[0].pow(2).sum(), list(m.parameters()))
        found.append(grads)
    for a, b in zip(*found):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.fixture
def backward_calls(monkeypatch):
    """The arguments of every layer_backward call the autograd makes."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.lstm_fused, name)

        def layer_backward(self, *args):
            calls.append(args)
            return torch.ops.lstm_fused.layer_backward(*args)

    monkeypatch.setattr(ops, "_ops", Spy())
    return calls


def test_absent_output_gradients_reach_the_op_as_none(backward_calls):
    """A loss on h_n alone: the op gets None for y's gradient, and None for
    the saved gates' and cells' (no tensors of zeros are made for them)."""
    ref, ours = pair(3, 4, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _, (h_n, _) = ours(x)
    h_n.sum().backward()
    assert [[a is None for a in args[:3]] for args in backward_calls] == [[True, False, True]]
    ref(x)[1][0].sum().backward()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10)


def test_input_without_gradient_skips_dx(backward_calls):
    """The first layer of a model whose input needs no gradient asks the op
    for no dx (input_grad=False, dx not computed); the second asks for it."""
    ref, ours = pair(3, 4, torch.float64, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ours(x)[0].sum().backward()
    assert [args[-1] for args in backward_calls] == [True, False]  # the last layer first
    ref(x)[0].sum().backward()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10)


def test_opcheck_backward_without_input_gradient():
    args, bs = layer_args(2, True, [3, 2, 1], requires_grad=False)
    y, h_n, c_n, gates, cells = torch.ops.lstm_fused.layer_forward(*args, bs, False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
    back = (torch.ones_like(y), None, torch.ones_like(c_n), x, h0, c0, w_ih, w_hh, w_hr, bs,
            False, True, y, gates, cells)
    full = torch.ops.lstm_fused.layer_backward(*back)
    lean = torch.ops.lstm_fused.layer_backward(*back, False)
    assert lean[0].shape == (0, x.shape[1])
    for u, v in zip(full[1:], lean[1:]):
        assert torch.equal(u, v)
    torch.library.opcheck(torch.ops.lstm_fused.layer_backward, (*back, False))


def test_first_order_backward_is_fused(monkeypatch):
    """Only create_graph=True recomputes through the reference."""
    def fail(*args, **kwargs):
        raise AssertionError("reference used in a first-order backward")

    monkeypatch.setattr(reference, "layer", fail)
    args, bs = layer_args(2, True, [3, 2, 1], requires_grad=True)
    y, h, c = ops.layer(*args, batch_sizes=bs)
    (y.sum() + c.sum()).backward()
    assert all(a.grad is not None for a in args if a is not None)


def _opcheck_samples():
    samples = []
    for k, (name, proj, bias, batch_sizes, reverse) in enumerate(LAYERS):
        args, bs = layer_args(proj, bias, batch_sizes, seed=k)
        if k % 2:  # mixed requires_grad: input and h0 without
            args = (args[0].detach(), args[1].detach()) + args[2:]
        samples.append((name, args, bs, reverse))
    return samples


@pytest.mark.parametrize("name,args,bs,reverse", _opcheck_samples(),
                         ids=[s[0] for s in _opcheck_samples()])
def test_opcheck(name, args, bs, reverse):
    torch.library.opcheck(torch.ops.lstm_fused.layer_forward, (*args, bs, reverse))
    y, h, c, gates, cells = torch.ops.lstm_fused.layer_forward(*args, bs, reverse)
    x, h0, c0, w_ih, w_hh, b_ih, _, w_hr = [a.detach() if a is not None else None for a in args]
    g = torch.Generator().manual_seed(5)
    grad_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    grad_c = torch.randn(c.shape, generator=g, dtype=c.dtype)
    for grads in ((grad_y, None, grad_c), (None, h.detach(), None)):
        torch.library.opcheck(torch.ops.lstm_fused.layer_backward, (
            *grads, x, h0, c0, w_ih, w_hh, w_hr, bs, reverse, b_ih is not None,
            y.detach(), gates, cells))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_in_eval_mode(device):
    ref, ours = pair(3, 4, torch.float64, num_layers=2, bidirectional=True, dropout=0.3)
    ref, ours = ref.to(device).eval(), ours.to(device).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    compare(run(ref, x, None), run(ours, x, None), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bitwise_deterministic(device, dtype):
    with num_threads(2):
        _, ours = pair(32, 64, dtype, num_layers=2, bidirectional=True, proj_size=16,
                       dropout=0.2)
        ours = ours.to(device)
        x = torch.randn(10, 16, 32, dtype=dtype, device=device)
        lengths = torch.randint(1, 11, (16,), generator=torch.Generator().manual_seed(0))
        for fn, extra in ((run, ()), (run_packed, (lengths,))):
            first = fn(ours, x, *extra, None, seed=3)
            second = fn(ours, x, *extra, None, seed=3)
            assert len(first) == 3 + 1 + 20 and all(t is not None for t in first)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
