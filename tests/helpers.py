"""Shared test helpers: a pair of modules with the same weights, and a
comparison of everything a forward+backward produces."""
import contextlib
import copy
import threading

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op thread count at n for the block, then as it was."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pair(input_size, hidden_size, dtype=torch.float64, seed=0, **kw):
    """(nn.LSTM, lstm_fused.LSTM) with identical weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden_size, dtype=dtype, **kw)
    ours = lstm_fused.LSTM(input_size, hidden_size, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_close(actual, expected, dtype, what=""):
    """Relative to the size of the expected values, per tensor."""
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def run(module, x, hx, seed=1):
    """Forward, then backward of a loss that touches every output; returns
    outputs and gradients (input, h0, c0, every parameter) as a flat list."""
    x = x.detach().clone().requires_grad_(True)
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_(True) for h in hx)
    module.zero_grad()
    inp = x
    if isinstance(x, PackedSequence):
        raise TypeError("pass padded input and lengths via run_packed")
    torch.manual_seed(seed)
    out, (h_n, c_n) = module(inp, hx)
    g = torch.Generator().manual_seed(123)
    loss = ((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
            + (h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)).sum()
            + (c_n * torch.randn(c_n.shape, generator=g, dtype=out.dtype)).sum())
    loss.backward()
    grads = [x.grad] + ([h.grad for h in hx] if hx is not None else [])
    grads += [p.grad for p in module.parameters()]
    return [out, h_n, c_n] + grads


def run_packed(module, x, lengths, hx, batch_first=False, enforce_sorted=False, seed=1):
    x = x.detach().clone().requires_grad_(True)
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_(True) for h in hx)
    module.zero_grad()
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                  enforce_sorted=enforce_sorted)
    torch.manual_seed(seed)
    out, (h_n, c_n) = module(packed, hx)
    assert isinstance(out, PackedSequence)
    g = torch.Generator().manual_seed(123)
    data = out.data
    loss = ((data * torch.randn(data.shape, generator=g, dtype=data.dtype)).sum()
            + (h_n * torch.randn(h_n.shape, generator=g, dtype=data.dtype)).sum()
            + (c_n * torch.randn(c_n.shape, generator=g, dtype=data.dtype)).sum())
    loss.backward()
    grads = [x.grad] + ([h.grad for h in hx] if hx is not None else [])
    grads += [p.grad for p in module.parameters()]
    return [data, h_n, c_n] + grads


def compare(ref_results, our_results, dtype):
    names = ["output", "h_n", "c_n", "grad"]
    assert len(ref_results) == len(our_results)
    for k, (a, b) in enumerate(zip(our_results, ref_results)):
        assert (a is None) == (b is None), f"result {k}: one side has no gradient"
        if a is not None:
            assert_close(a, b, dtype, what=f"result {k} ({names[min(k, 3)]})")


def clone(module):
    return copy.deepcopy(module)


def lstm_work(module):
    """A forward and backward of module as a function of its input: the
    outputs and the gradients of the input and every parameter."""
    def work(x):
        x = x.clone().requires_grad_(True)
        out, (h, c) = module(x)
        grads = torch.autograd.grad(out.square().sum() + h.sum() + c.sum(),
                                    [x, *module.parameters()])
        return [out.detach(), h.detach(), c.detach(), *grads]
    return work


def assert_threads_match_serial(work, inputs, rounds=1):
    """work(inputs[k]) from len(inputs) threads at once, `rounds` times each,
    bitwise equal to the same calls one after another."""
    serial = [work(x) for x in inputs]
    results = [[None] * len(inputs) for _ in range(rounds)]
    barrier = threading.Barrier(len(inputs))
    errors = []

    def thread(k):
        try:
            barrier.wait()
            for r in range(rounds):
                results[r][k] = work(inputs[k])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=thread, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in range(rounds):
        for k, expected in enumerate(serial):
            for u, v in zip(results[r][k], expected):
                assert torch.equal(u, v), f"round {r}, thread {k}"


def readme_code(section):
    """The first ```python block of the README's section `## {section}`."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


# Losses on part of a module's outputs (out, h_n, c_n): the backward gets
# None for the others, and must still give nn.LSTM's gradients.
PARTS = {
    "last-h": lambda out, h, c: h[-1].pow(2).sum(),  # a classifier on h_n
    "c-only": lambda out, h, c: c.sin().sum(),
    "out-only": lambda out, h, c: out.pow(2).sum(),
    "h-and-out": lambda out, h, c: h.sum() + out[-1].sum(),
}
