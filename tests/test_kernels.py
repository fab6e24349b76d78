"""The CPU kernel paths at sizes that cross their tiles: register tiles of 6
rows and 16 units with AVX2 or 32 with AVX-512 (half for float64), AVX-512's
gate tiles (6 rows, the four gates of 16 units) with x_t in them or, where
the weights exceed 12 MB, after an input projection, row blocks of 96, K
blocks of 256, batch 1 (W read in place), one-step calls (batch in vector
lanes), short calls whose backward reads W in place and long ones that pack
it, backward in several spans of steps, two threads, the inference path that
keeps nothing for backward; and, in subprocesses, the lower instruction sets
this processor can also run: AVX2 where it has AVX-512, and the generic
(BLAS) path that processors without AVX2 take."""
import os
import subprocess
import sys

import pytest
import torch

import lstm_fused

from torch.nn.utils.rnn import pack_padded_sequence

from helpers import compare, num_threads, pair, run, run_packed

F32, F64 = torch.float32, torch.float64

# (T, B, I, H, extra): every case does enough work per step for two threads.
SHAPES = [
    (7, 13, 37, 45, {}),                       # partial unit chunk, tiles 5+4+4
    (9, 25, 37, 45, {"bidirectional": True}),  # enough rows to pack W for backward
    (3, 1, 300, 70, {"bidirectional": True}),  # batch 1: dot products, K tail
    (1, 64, 50, 40, {}),                       # one step, 4 batch panels
    (1, 19, 33, 24, {"proj_size": 7, "bidirectional": True}),  # one step, projection
    (4, 33, 290, 100, {"num_layers": 2}),      # K blocks of 256 and a tail
    (2, 97, 20, 16, {}),                       # two row blocks of 96 rows
    (5, 8, 16, 130, {"proj_size": 33, "bias": False}),
    (6, 14, 140, 70, {}),                      # AVX-512: chunks 32+32+6
    (3, 9, 2200, 340, {}),                     # AVX-512: W over 12 MB: projection, gate tiles
]


def _hx(ours, B, dtype):
    D = 2 if ours.bidirectional else 1
    P = ours.proj_size or ours.hidden_size
    return (torch.randn(ours.num_layers * D, B, P, dtype=dtype),
            torch.randn(ours.num_layers * D, B, ours.hidden_size, dtype=dtype))


@pytest.fixture
def two_threads():
    with num_threads(2):
        yield


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s[:4]))
def test_tiles_match_nn(shape, dtype, two_threads):
    T, B, I, H, kw = shape
    ref, ours = pair(I, H, dtype, **kw)
    x = torch.randn(T, B, I, dtype=dtype)
    hx = _hx(ours, B, dtype)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("proj_size", [21, 0])
def test_packed_tiles_match_nn(dtype, proj_size, two_threads):
    """Batch sizes that change from step to step, with and without a
    projection (which makes h after the cell)."""
    ref, ours = pair(50, 100, dtype, bidirectional=True, proj_size=proj_size)
    x = torch.randn(9, 33, 50, dtype=dtype)
    lengths = torch.randint(1, 10, (33,), generator=torch.Generator().manual_seed(3))
    lengths[5] = 9
    hx = _hx(ours, 33, dtype)
    compare(run_packed(ref, x, lengths, hx), run_packed(ours, x, lengths, hx), dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("I", [32, 800])
def test_backward_spans_match_nn(dtype, I, two_threads):
    """Backward in spans of 8 MB of gate gradients (weight gradients summed span by
    span): several spans in both directions, with variable lengths, and with
    an input wider than the hidden size (W_ih and W_hh over 4 MB)."""
    ref, ours = pair(I, 256, dtype, bidirectional=True)
    x = torch.randn(40, 64, I, dtype=dtype)
    lengths = torch.randint(20, 41, (64,), generator=torch.Generator().manual_seed(5))
    lengths[3] = 40
    hx = _hx(ours, 64, dtype)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)
    compare(run_packed(ref, x, lengths, hx), run_packed(ours, x, lengths, hx), dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("I,packed", [(37, False), (800, True)], ids=["short", "long-packed"])
def test_input_without_gradient(dtype, I, packed, two_threads):
    """An input that needs no gradient (features, frozen embeddings): the
    first layer's backward skips dx; every other gradient is nn.LSTM's (the
    weights read in place for a short call, packed for a long one, several
    spans, variable lengths)."""
    ref, ours = pair(I, 64 if packed else 45, dtype, num_layers=2, bidirectional=True)
    T, B = (40, 64) if packed else (5, 13)
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=torch.Generator().manual_seed(5))
    lengths[0] = T
    found = []
    for m in (ref, ours):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (h_n, c_n) = m(inp)
        data = out.data if packed else out
        loss = data.pow(2).sum() + h_n.sum() + c_n.sin().sum()
        found.append([data, *torch.autograd.grad(loss, list(m.parameters()))])
    compare(found[0], found[1], dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s[:4]))
def test_inference_matches_nn(shape, two_threads):
    T, B, I, H, kw = shape
    ref, ours = pair(I, H, F64, **kw)
    x = torch.randn(T, B, I, dtype=F64)
    with torch.no_grad():
        expected, (eh, ec) = ref(x)
        out, (h, c) = ours(x)
    compare([expected, eh, ec], [out, h, c], F64)


@pytest.mark.parametrize("T,B", [(7, 13), (3, 1), (1, 64)])
def test_inference_op_keeps_nothing(T, B, two_threads):
    """save=False: the same outputs, and no activations or cells kept."""
    I, H = 30, 40
    g = torch.Generator().manual_seed(0)
    x, h0, c0 = (torch.randn(n, k, generator=g, dtype=F64) for n, k in
                 ((T * B, I), (B, H), (B, H)))
    w_ih, w_hh = torch.randn(4 * H, I, dtype=F64) * 0.2, torch.randn(4 * H, H, dtype=F64) * 0.2
    b = torch.randn(4 * H, dtype=F64)
    args = (x, h0, c0, w_ih, w_hh, b, b, None, None, False)
    full = torch.ops.lstm_fused.layer_forward(*args)
    lean = torch.ops.lstm_fused.layer_forward(*args, False)
    for u, v in zip(full[:3], lean[:3]):
        assert torch.equal(u, v)
    assert full[3].shape == (T * B, 4 * H) and full[4].shape == (T * B, H)
    assert lean[3].shape == (0, 4 * H) and lean[4].shape == (0, H)
    torch.library.opcheck(torch.ops.lstm_fused.layer_forward, (*args, False))


@pytest.mark.skipif(os.environ.get("LSTM_FUSED_CPU_GENERIC") == "1",
                    reason="the BLAS may sum in another order on another thread count")
@pytest.mark.parametrize("T,B,I,H", [(12, 30, 96, 80), (6, 70, 40, 200), (8, 60, 40, 48)],
                         ids=["static", "claimed", "by_rows"])
def test_bitwise_equal_across_thread_counts(T, B, I, H):
    """Each output and gradient of the fused kernels is summed by one thread
    in a fixed order, so the thread count does not change a bit (without a
    projection: dW_hr is the BLAS's). With 4H >= 768 rows of weight
    gradients two threads claim their row blocks as they go (a slower core
    takes fewer): which thread took which may not show either. With small
    weights and a dense batch (AVX-512) each thread runs its own rows through
    the forward's steps instead of its own units: no bit may change either."""
    ref, ours = pair(I, H, F32, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I)
    results = []
    for threads in (1, 2, 2):
        with num_threads(threads):
            results.append(run(ours, x, None))
    for other in results[1:]:
        for k, (u, v) in enumerate(zip(results[0], other)):
            assert torch.equal(u, v), f"result {k}"
    compare(run(ref, x, None), results[0], F32)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _forced():
    return (os.environ.get("LSTM_FUSED_CPU_GENERIC", "0") not in ("", "0")
            or bool(os.environ.get("LSTM_FUSED_CPU_ISA")))


@pytest.mark.skipif(_cpu_flags() is None or _forced(), reason="no /proc/cpuinfo, or ISA forced")
def test_isa_is_the_best_the_processor_has():
    flags = _cpu_flags()
    if flags >= {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"}:
        want = "avx512"
    elif flags >= {"avx2", "fma"}:
        want = "avx2"
    else:
        want = "generic"
    assert lstm_fused.cpu_isa() == want


def _isa_env(isa):
    if isa == "generic":
        return {"LSTM_FUSED_CPU_GENERIC": "1"}
    return {"LSTM_FUSED_CPU_ISA": isa}


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_isa(isa):
    """A lower instruction set than this process's, as on a processor that
    has only that: this file and the parity suite in a subprocess."""
    order = ["generic", "avx2", "avx512"]
    if order.index(isa) >= order.index(lstm_fused.cpu_isa()):
        pytest.skip(f"this process already runs {lstm_fused.cpu_isa()}")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, **_isa_env(isa))
    code = "import lstm_fused; print(lstm_fused.cpu_isa())"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.stdout.strip() == isa, got.stderr
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           os.path.join(here, "test_kernels.py"), os.path.join(here, "test_parity.py"),
           "-k", "not lower_isa and not random_grid"]
    proc = subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
