"""bilayer_forward / bilayer_backward: both directions of a bidirectional
layer in one op (on CUDA one persistent launch, tests/test_cuda.py and
tests/test_cuda_emu.py). Here, on the CPU: the ops against two layer_forward
calls, their registration (opcheck), gradients (gradcheck, gradgradcheck),
errors, and lstm_fused.LSTM running its bidirectional layers through them
(as it does on CUDA) against nn.LSTM."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import ops
from helpers import PARTS

DT = torch.float64


def weights(I, H, P=None, bias=True, seed=0, dtype=DT, grad=False):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one direction."""
    g = torch.Generator().manual_seed(seed)
    P = P or H

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)
    return (t(4 * H, I), t(4 * H, P), t(4 * H) if bias else None, t(4 * H) if bias else None,
            t(P, H) if P != H else None)


def inputs(T, B, I, H, P=None, dtype=DT, grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = P or H
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)
            for s in ((T * B, I), (2, B, P), (2, B, H))]


CASES = [
    dict(),
    dict(P=3),
    dict(bias=False),
    dict(packed=[4, 3, 3, 1]),
    dict(P=2, packed=[4, 4, 2]),
]


def case_args(c, dtype=DT, grad=False):
    I, H, P, B = 5, 6, c.get("P"), 4
    batch_sizes = torch.tensor(c["packed"]) if "packed" in c else None
    T = 4 if batch_sizes is None else len(batch_sizes)
    x, h0, c0 = inputs(T, B, I, H, P, dtype, grad)
    if batch_sizes is not None:
        x = x[:int(batch_sizes.sum())]
    fw = weights(I, H, P, c.get("bias", True), seed=2, dtype=dtype, grad=grad)
    rw = weights(I, H, P, c.get("bias", True), seed=3, dtype=dtype, grad=grad)
    return x, h0, c0, fw, rw, batch_sizes


@pytest.mark.parametrize("c", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_same_as_two_layer_calls(c, dtype):
    """Forward and backward, bitwise: the directions run the same kernels."""
    x, h0, c0, fw, rw, bs = case_args(c, dtype, grad=True)
    y, h_n, c_n = ops.bilayer(x, h0, c0, fw, rw, batch_sizes=bs)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum() + h_n.sum() + (c_n ** 2).sum(),
                                [x, h0, c0, *[w for w in fw + rw if w is not None]])
    parts = [ops.layer(x, h0[d], c0[d], *w, batch_sizes=bs, reverse=d == 1)
             for d, w in enumerate((fw, rw))]
    y2 = torch.cat([p[0] for p in parts], 1)
    h2, c2 = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
    grads2 = torch.autograd.grad((y2 * gy).sum() + h2.sum() + (c2 ** 2).sum(),
                                 [x, h0, c0, *[w for w in fw + rw if w is not None]])
    for a, b in zip((y, h_n, c_n, *grads), (y2, h2, c2, *grads2)):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_opcheck(c):
    x, h0, c0, fw, rw, bs = case_args(c, grad=True)
    torch.library.opcheck(torch.ops.lstm_fused.bilayer_forward,
                          (x, h0, c0, *fw, *rw, bs))
    detached = [t.detach() if t is not None else None for t in (x, h0, c0, *fw, *rw)]
    torch.library.opcheck(torch.ops.lstm_fused.bilayer_forward, (*detached, bs, False))
    with torch.no_grad():
        y, h_n, c_n, gates, cells = torch.ops.lstm_fused.bilayer_forward(
            x, h0, c0, *fw, *rw, bs)
    g = [torch.randn_like(t) for t in (y, h_n, c_n)]
    x, h0, c0, *weights = detached
    fw, rw = weights[:5], weights[5:]
    for grads in (g, (None, g[1], None)):
        torch.library.opcheck(
            torch.ops.lstm_fused.bilayer_backward,
            (*grads, x, h0, c0, fw[0], fw[1], fw[4], rw[0], rw[1], rw[4], bs, fw[2] is not None,
             y, gates, cells))


@pytest.mark.parametrize("c", [dict(), dict(P=2, packed=[3, 2, 2])], ids=str)
def test_gradcheck(c):
    x, h0, c0, fw, rw, bs = case_args(c, grad=True)
    x = x[:9] if bs is None else x  # a short sequence keeps it quick
    x, h0, c0 = (t.detach()[:, :3].clone().requires_grad_() if t.dim() == 3 else t
                 for t in (x, h0, c0))
    if bs is None:
        x = x.detach()[:6].clone().requires_grad_()  # 2 steps of 3 rows
    leaves = [x, h0, c0, *[w for w in fw + rw if w is not None]]

    def f(*a):
        it = iter(a[3:])
        fw2 = [next(it) if w is not None else None for w in fw]
        rw2 = [next(it) if w is not None else None for w in rw]
        return ops.bilayer(a[0], a[1], a[2], fw2, rw2, batch_sizes=bs)
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


def test_errors():
    x, h0, c0, fw, rw, _ = case_args({})
    with pytest.raises(RuntimeError, match=r"h0 of a bidirectional layer must be \[2, batch"):
        torch.ops.lstm_fused.bilayer_forward(x, h0[0], c0, *fw, *rw, None)
    with pytest.raises(RuntimeError, match=r"h0 of a bidirectional layer must be \[2, batch"):
        torch.ops.lstm_fused.bilayer_forward(x, torch.cat([h0, h0]), c0, *fw, *rw, None)
    small = weights(5, 3, seed=4)  # the reverse direction's hidden size 3, not 6
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[4, 3\], got \[4, 6\]"):
        torch.ops.lstm_fused.bilayer_forward(x, h0, c0, *fw, *small, None)
    with pytest.raises(RuntimeError, match="must have dtype"):
        torch.ops.lstm_fused.bilayer_forward(x.float(), h0, c0, *fw, *rw, None)


CONFIGS = [
    dict(bidirectional=True),
    dict(num_layers=3, bidirectional=True, dropout=0.0),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
    dict(num_layers=2, bidirectional=True, bias=False),
]


@pytest.fixture
def pair_on_cpu(monkeypatch):
    """lstm_fused.LSTM's bidirectional layers on the CPU through bilayer, as
    on CUDA."""
    monkeypatch.setattr(ops, "PAIR_DEVICES", {"cpu", "cuda"})
    calls = []
    original = ops.bilayer

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(ops, "bilayer", counted)
    return calls


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
def test_module_through_bilayer_matches_nn_lstm(pair_on_cpu, cfg, packed, with_hx):
    torch.manual_seed(0)
    ref = nn.LSTM(5, 6, **cfg).double()
    ours = lstm_fused.LSTM(5, 6, **cfg).double()
    ours.load_state_dict(ref.state_dict())
    T, B = 6, 3
    bf = cfg.get("batch_first", False)
    x = torch.randn((B, T, 5) if bf else (T, B, 5), dtype=DT)
    D = 2 * cfg.get("num_layers", 1)
    P = cfg.get("proj_size", 0) or 6
    hx = (torch.randn(D, B, P, dtype=DT), torch.randn(D, B, 6, dtype=DT)) if with_hx else None
    lengths = [6, 4, 2]

    def run(m):
        xl = x.clone().requires_grad_()
        hl = tuple(h.clone().requires_grad_() for h in hx) if hx else None
        inp = pack_padded_sequence(xl, lengths, batch_first=bf) if packed else xl
        out, (h_n, c_n) = m(inp, hl)
        data = out.data if packed else out
        g = torch.Generator().manual_seed(5)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum()
                   for t in (data, h_n, c_n))
        loss.backward()
        return [data, h_n, c_n, xl.grad] + ([h.grad for h in hl] if hl else []) + \
            [p.grad for p in m.parameters()]
    expected, got = run(ref), run(ours)
    assert len(pair_on_cpu) == cfg.get("num_layers", 1)  # one bilayer call per layer
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)


def test_module_inference_and_double_backward(pair_on_cpu):
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, 2, bidirectional=True).double()
    ours = lstm_fused.LSTM(4, 5, 2, bidirectional=True).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4, dtype=DT, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)
    # create_graph: each direction's differentiable backward (_Backward).
    found = []
    for m in (ref, ours):
        xl = x.detach().clone().requires_grad_()
        out, (h_n, _) = m(xl)
        (g,) = torch.autograd.grad(out.pow(2).sum() + h_n.sum(), xl, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), xl)
        found.append((g, gg))
    assert len(pair_on_cpu) == 4  # 2 layers, inference and the create_graph call
    for e, o in zip(*found):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("part", PARTS, ids=list(PARTS))
@pytest.mark.parametrize("create_graph", [False, True], ids=["first", "double"])
def test_loss_on_part_of_the_outputs(pair_on_cpu, part, create_graph):
    """The backward gets None for the outputs the loss leaves out."""
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, 2, bidirectional=True).double()
    ours = lstm_fused.LSTM(4, 5, 2, bidirectional=True).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4, dtype=DT)
    found = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        out, (h_n, c_n) = m(xl)
        grads = torch.autograd.grad(PARTS[part](out, h_n, c_n), [xl, *m.parameters()],
                                    create_graph=create_graph)
        if create_graph:
            grads = torch.autograd.grad(grads[0].pow(2).sum(), list(m.parameters()))
        found.append(grads)
    assert len(pair_on_cpu) == 2
    for e, o in zip(*found):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)


def test_transforms_and_compile_run_the_directions_as_layers(pair_on_cpu):
    """torch.func and compile go through `layer` (whose transforms and fake
    impls they use); eager calls through bilayer."""
    m = lstm_fused.LSTM(3, 4, bidirectional=True).double()
    x = torch.randn(4, 2, 3, dtype=DT)
    params = dict(m.named_parameters())
    torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sum())(params)
    assert pair_on_cpu == []
    m(x)
    assert pair_on_cpu == [1]
