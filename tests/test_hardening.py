"""Hardening: NaN/Inf propagate as in nn.LSTM; no leaks or reference cycles;
very long sequences and wide layers; threads; bit-identical reruns."""
import gc
import re
import time
import weakref

import pytest
import torch

import lstm_fused
from helpers import assert_threads_match_serial, compare, lstm_work, num_threads, pair, run

F32, F64 = torch.float32, torch.float64


def rss_kb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1])


@pytest.fixture
def one_thread():
    """Tiny ops on a busy machine: intra-op threads only add waiting."""
    with num_threads(1):
        yield


# ------------------------------------------------------------- NaN and Inf

def assert_same_specials(actual, expected, what, tol=1e-10):
    """Same NaN and ±Inf positions; the finite values close."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +Inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -Inf positions differ"
    finite = expected.isfinite()
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def poisoned(where, value, dtype=F64):
    """Modules and an input with `value` in one element of the input or a parameter."""
    ref, ours = pair(3, 4, dtype, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3, dtype=dtype)
    if where == "input":
        x[2, 1, 0] = value  # one step of one sequence
    else:
        for m in (ref, ours):
            with torch.no_grad():
                getattr(m, where).view(-1)[5] = value
    return ref, ours, x


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("where", ["input", "weight_ih_l0", "weight_hh_l0", "bias_hh_l1_reverse"])
def test_nan_inf_propagate_like_nn(where, value, dtype):
    """float32 too: the vector exp saturates sigmoid and tanh to exactly 0 and
    ±1, so a saturated gate's derivative is 0 (and 0 * Inf NaN) as in nn.LSTM."""
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"),
             "huge": 1e308 if dtype == F64 else 1e38}[value]
    ref, ours, x = poisoned(where, value, dtype)
    hx = (torch.randn(4, 2, 4, dtype=dtype), torch.randn(4, 2, 4, dtype=dtype))
    a, b = run(ref, x, hx), run(ours, x, hx)
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [
        f"grad {n}" for n, _ in ours.named_parameters()]
    if value != value:  # NaN reaches the outputs (Inf may saturate a gate)
        assert a[0].isnan().any() and a[-1].isnan().any()
    for u, v, name in zip(b, a, names):
        assert_same_specials(u, v, name, 1e-10 if dtype == F64 else 1e-4)


def test_nan_in_h0_and_packed_input_like_nn():
    from helpers import run_packed
    ref, ours = pair(3, 4, F64, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=F64)
    x[4, 0, 1] = float("nan")
    hx = (torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64))
    hx[1][0, 2, 3] = float("inf")
    a = run_packed(ref, x, [5, 2, 4], hx)
    b = run_packed(ours, x, [5, 2, 4], hx)
    for k, (u, v) in enumerate(zip(b, a)):
        assert_same_specials(u, v, f"result {k}")


# ----------------------------------------------------------------- memory

def step(m, x, hx):
    out, (h, c) = m(x, hx)
    (out.sum() + h.sum() + c.sum()).backward()


@pytest.mark.slow
def test_10k_calls_keep_rss_flat(one_thread):
    """10,000 forward+backward calls; RSS after them within 8 MB of RSS after
    a warm-up (one call's tensors are ~10 kB, so a leak of one tensor per call
    would add ~100 MB)."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(4, 16, bidirectional=True)
    x = torch.randn(8, 4, 4, requires_grad=True)
    hx = (torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 4, 16, requires_grad=True))
    for _ in range(500):
        step(m, x, hx)
    gc.collect()
    before = rss_kb()
    start = time.perf_counter()
    for _ in range(10_000):
        step(m, x, hx)
        m.zero_grad(set_to_none=True)
        x.grad = hx[0].grad = hx[1].grad = None
    seconds = time.perf_counter() - start
    gc.collect()
    grown = rss_kb() - before
    print(f"10k forward+backward: {seconds:.1f} s, RSS {grown:+d} kB")
    assert grown < 8 * 1024, f"RSS grew by {grown} kB over 10,000 calls"


def test_no_reference_cycles_through_autograd():
    """Outputs, saved tensors and the graph are freed by reference counting
    alone (the cycle collector is off), with and without backward."""
    m = lstm_fused.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True)
    gc.collect()
    gc.disable()
    try:
        for backward in (False, True):
            x = torch.randn(5, 2, 3, requires_grad=True)
            out, (h, c) = m(x)
            refs = [weakref.ref(t) for t in (out, h, c)]
            # what the graph saved for backward, less the parameters
            params = {p.data_ptr() for p in m.parameters()}
            saved = [weakref.ref(t) for t in _saved_tensors(out) if t.data_ptr() not in params]
            assert saved
            if backward:
                (out.sum() + h.sum() + c.sum()).backward()
            del out, h, c, x
            assert all(r() is None for r in refs), "an output outlived its last reference"
            assert all(r() is None for r in saved), "a saved tensor outlived its graph"
        assert gc.collect() == 0, "forward/backward left reference cycles"
    finally:
        gc.enable()


def _saved_tensors(out):
    """Tensors saved by our op's autograd nodes in the graph of `out`."""
    found, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    v = getattr(node, name)
                except RuntimeError:
                    continue
                vs = v if isinstance(v, tuple) else (v,)
                found += [t for t in vs if isinstance(t, torch.Tensor)]
        stack += [n for n, _ in node.next_functions]
    return found


# ---------------------------------------------------------- long and large

def graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:  # iterative: a per-step graph of 100k nodes would be found, not recursed
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack += [n for n, _ in node.next_functions]
    return len(seen)


def saved_bytes(fn):
    """Bytes of the tensors autograd saves while running fn."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return total[0], result


@pytest.mark.slow
def test_100k_steps_match_nn_linear_memory_no_recursion(one_thread):
    H, I = 4, 3
    ref, ours = pair(I, H, F64)
    out = {}
    for T in (50_000, 100_000):
        x = torch.randn(T, 1, I, dtype=F64, requires_grad=True)
        nbytes, (y, (h, c)) = saved_bytes(lambda: ours(x))
        out[T] = nbytes
        assert graph_size(y) < 20  # one node per layer, not per step
        if T == 100_000:
            start = time.perf_counter()
            (y.sum() + h.sum() + c.sum()).backward()
            print(f"T=100k backward {time.perf_counter() - start:.2f} s")
            with torch.no_grad():
                ry, (rh, rc) = ref(x)
            torch.testing.assert_close(y, ry, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(c, rc, rtol=1e-9, atol=1e-9)
            assert x.grad.isfinite().all() and x.grad[0].abs().sum() > 0
    # saved: x, y, gates, cells (per step) + weights and h0/c0 (constant)
    assert 1.9 < out[100_000] / out[50_000] < 2.01, out
    assert out[100_000] <= 100_000 * (I + H + 4 * H + H) * 8 + 64 * 1024, out


@pytest.mark.slow
def test_100k_steps_gradient_matches_nn_on_a_window(one_thread):
    """Backward through 100k steps: dx of the last 200 steps for a loss on the
    last 50 outputs, against nn.LSTM run from its state 200 steps before the end."""
    ref, ours = pair(2, 3, F64)
    T, W = 100_000, 200
    x = torch.randn(T, 1, 2, dtype=F64)
    xi = x.clone().requires_grad_(True)
    y, _ = ours(xi)
    y[-50:].sum().backward()
    with torch.no_grad():
        _, state = ref(x[:-W])
    xw = x[-W:].clone().requires_grad_(True)
    yw, _ = ref(xw, state)
    yw[-50:].sum().backward()
    torch.testing.assert_close(y[-W:], yw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(xi.grad[-W:], xw.grad, rtol=1e-9, atol=1e-12)
    assert xw.grad[-50:].abs().min() > 0 and not xi.grad[:-W].isnan().any()


@pytest.mark.parametrize("H", [1, 2, 3])
def test_tiny_hidden_sizes(H):
    ref, ours = pair(2, H, F64, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 2, dtype=F64)
    compare(run(ref, x, None), run(ours, x, None), F64)


@pytest.mark.slow
def test_hidden_4096_forward_matches_nn():
    """One set of weights (270 MB in float32) shared by both modules."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 4096)
    ours = lstm_fused.LSTM(4, 4096, device="meta")
    for name, p in ref.named_parameters():
        setattr(ours, name, p)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        a, (ah, ac) = ref(x)
        b, (bh, bc) = ours(x)
    for u, v in [(b, a), (bh, ah), (bc, ac)]:
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert b.abs().max() > 0.01


# -------------------------------------------------------------- threads

def test_four_threads_match_serial_bitwise():
    torch.manual_seed(0)
    m = lstm_fused.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    inputs = [torch.randn(20, 3, 5, generator=torch.Generator().manual_seed(k))
              for k in range(4)]
    assert_threads_match_serial(lstm_work(m), inputs, rounds=10)


# ---------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_bitwise_identical_reruns(dtype):
    ref, ours = pair(5, 6, dtype, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(12, 4, 5, dtype=dtype)
    hx = (torch.randn(4, 4, 3, dtype=dtype), torch.randn(4, 4, 6, dtype=dtype))
    first, second = run(ours, x, hx), run(ours, x, hx)
    for k, (u, v) in enumerate(zip(first, second)):
        assert torch.equal(u, v), f"result {k} differs between runs"
