"""torch.func's transforms over lstm_fused.LSTM and LSTMCell give nn.LSTM's
derivatives (float64): grad, vjp, jacrev, jvp/jacfwd and forward-mode AD,
second derivatives, and vmap, including per-sample gradients (vmap of grad),
which nn.LSTM fails (torch 2.13)."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from helpers import pair, readme_code

DT = torch.float64
CFGS = [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=2, batch_first=True),
        dict(bias=False)]
cfg_id = lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"  # noqa: E731
TOL = dict(rtol=1e-9, atol=1e-10)


def close(a, b):
    for u, v in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(u, v, **TOL)


def inputs(cfg, steps=5, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, steps, 4) if cfg.get("batch_first") else (steps, batch, 4)
    return torch.randn(shape, generator=g, dtype=DT)


def params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def loss(module):
    """(params, x) -> a scalar of every output."""
    def f(p, x):
        out, (h, c) = functional_call(module, p, (x,))
        return out.sin().sum() + (h * 1.5).sum() + c.square().sum()
    return f


@pytest.mark.parametrize("cfg", CFGS, ids=cfg_id)
def test_grad(cfg):
    ref, ours = pair(4, 5, DT, **cfg)
    x, p = inputs(cfg), params(ref)
    close(grad(loss(ours), argnums=(0, 1))(p, x), grad(loss(ref), argnums=(0, 1))(p, x))


@pytest.mark.parametrize("cfg", CFGS[:3], ids=cfg_id)
def test_vjp_and_jacrev(cfg):
    ref, ours = pair(4, 5, DT, **cfg)
    x = inputs(cfg)
    (y_ref, (h_ref, _)), pull_ref = vjp(ref, x)
    (y, (h, c)), pull = vjp(ours, x)
    close((y, h), (y_ref, h_ref))
    g = torch.Generator().manual_seed(3)
    cot = (torch.randn(y.shape, generator=g, dtype=DT),
           (torch.randn(h.shape, generator=g, dtype=DT), torch.randn(c.shape, generator=g, dtype=DT)))
    close(pull(cot), pull_ref(cot))  # called after vjp's level ended
    close(jacrev(lambda x: ours(x)[1][0])(x), jacrev(lambda x: ref(x)[1][0])(x))


def test_grad_packed():
    """Packed input, gradients of the weights (nn.LSTM fails here under
    torch.func, torch 2.13, and so does the gradient of pack_padded_sequence's
    input): equal to nn.LSTM's by torch.autograd."""
    cfg = dict(num_layers=2, bidirectional=True)
    ref, ours = pair(4, 5, DT, **cfg)
    x = pack_padded_sequence(inputs(cfg), [5, 2, 4], enforce_sorted=False)

    def f(module):
        def of(p):
            out, (h, c) = functional_call(module, p, (x,))
            return out.data.sin().sum() + h.sum() + c.square().sum()
        return of
    p = {k: v.requires_grad_() for k, v in params(ref).items()}
    expected = torch.autograd.grad(f(ref)(p), list(p.values()))
    close(grad(f(ours))(p), expected)


def test_cell():
    torch.manual_seed(0)
    ref, ours = nn.LSTMCell(4, 5, dtype=DT), lstm_fused.LSTMCell(4, 5, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(3, 4, dtype=DT), (torch.randn(3, 5, dtype=DT), torch.randn(3, 5, dtype=DT))

    def f(module):
        def of(p, x, hx):
            h, c = functional_call(module, p, (x, hx))
            h, c = functional_call(module, p, (x.cos(), (h, c)))  # two steps
            return h.sin().sum() + c.square().sum()
        return of
    p = params(ref)
    close(grad(f(ours), argnums=(0, 1, 2))(p, x, hx), grad(f(ref), argnums=(0, 1, 2))(p, x, hx))
    close(jacrev(lambda x: ours(x, hx)[0])(x), jacrev(lambda x: ref(x, hx)[0])(x))
    close(jacfwd(lambda x: ours(x, hx)[1])(x), jacfwd(lambda x: ref(x, hx)[1])(x))


@pytest.mark.parametrize("cfg", CFGS[1:3], ids=cfg_id)
def test_second_derivatives(cfg):
    """grad of grad (a gradient penalty, into the weights), the Hessian by
    jacrev(jacrev) and by jacfwd(jacrev)."""
    ref, ours = pair(3, 4, DT, **cfg)
    x = inputs(cfg, steps=3, batch=2)[..., :3].contiguous()

    def penalty(module):
        def f(p, x):
            return grad(lambda x: loss(module)(p, x))(x).square().sum()
        return f
    close(grad(penalty(ours))(params(ours), x), grad(penalty(ref))(params(ref), x))

    def scalar(module):
        return lambda x: module(x)[0].sin().sum()
    close(jacrev(jacrev(scalar(ours)))(x), jacrev(jacrev(scalar(ref)))(x))
    close(jacfwd(jacrev(scalar(ours)))(x), jacfwd(jacrev(scalar(ref)))(x))


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_forward_mode(grad_enabled):
    """jvp, jacfwd, and forward-mode AD with dual tensors (also under
    no_grad, which does not turn forward mode off)."""
    cfg = dict(num_layers=2, bidirectional=True)
    ref, ours = pair(4, 5, DT, **cfg)
    x = inputs(cfg)
    t = inputs(cfg, seed=2)
    with torch.set_grad_enabled(grad_enabled):
        close(jvp(ours, (x,), (t,)), jvp(ref, (x,), (t,)))
        close(jacfwd(lambda x: ours(x)[1][1])(x), jacfwd(lambda x: ref(x)[1][1])(x))
        tangents = []
        for module in (ours, ref):
            with fwAD.dual_level():
                out, (h, c) = module(fwAD.make_dual(x, t))
                tangents.append([fwAD.unpack_dual(v).tangent for v in (out, h, c)])
        assert all(v is not None for v in tangents[0])
        close(*tangents)


@pytest.mark.parametrize("cfg", CFGS[:3], ids=cfg_id)
def test_per_sample_gradients(cfg):
    """vmap(grad): per-sample gradients, one vmapped call of the fused op (the
    samples folded into the batch), equal to a Python loop over nn.LSTM."""
    ref, ours = pair(4, 5, DT, **cfg)
    p = params(ref)
    samples = torch.stack([inputs(cfg, batch=2, seed=s) for s in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" fallback
        got = vmap(grad(loss(ours)), in_dims=(None, 0))(p, samples)
    expected = [grad(loss(ref))(p, x) for x in samples]
    close(got, {k: torch.stack([e[k] for e in expected]) for k in p})


def test_vmap_over_weights():
    """vmap over a stack of weight sets (an ensemble): one call per set."""
    cfg = dict(num_layers=2)
    ref, ours = pair(4, 5, DT, **cfg)
    x = inputs(cfg)
    stacked = {k: torch.stack([v, v * 0.5, -v]) for k, v in params(ref).items()}

    def out(module):
        return lambda p: functional_call(module, p, (x,))[0]
    expected = torch.stack([out(ref)({k: v[i] for k, v in stacked.items()}) for i in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(vmap(out(ours))(stacked), expected)
        close(vmap(grad(lambda p: out(ours)(p).sum()))(stacked),
              vmap(grad(lambda p: out(ref)(p).sum()))(stacked))


def test_vmap_inference():
    """vmap of the forward alone, with and without grad mode (nn.LSTM has no
    batching rule, torch 2.13)."""
    cfg = dict(bidirectional=True)
    ref, ours = pair(4, 5, DT, **cfg)
    samples = torch.stack([inputs(cfg, seed=s) for s in range(3)])
    expected = [ref(x) for x in samples]
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            out, (h, c) = vmap(ours)(samples)
        close((out, h, c), [torch.stack(v) for v in zip(*[(o, h, c) for o, (h, c) in expected])])


def test_readme_example():
    """The README's torch.func example, as written."""
    ref, model = pair(4, 5, DT)
    x, xs = inputs({}), torch.stack([inputs({}, seed=s) for s in range(3)])
    scope = {"torch": torch, "functional_call": functional_call, "model": model,
             "x": x, "xs": xs}
    exec(readme_code("torch.func"), scope)  # noqa: S102
    p = params(ref)
    f = lambda p, x: functional_call(ref, p, (x,))[0].square().sum()  # noqa: E731
    close(scope["grads"], grad(f)(p, x))
    close(scope["per_sample"], {k: torch.stack([grad(f)(p, x)[k] for x in xs]) for k in p})
