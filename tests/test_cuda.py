"""Parity of the CUDA kernels (skipped without a GPU).

float64/float32: lstm_fused.LSTM on the GPU against nn.LSTM on the CPU in the
same dtype, to the CPU suite's tolerances (TF32 off, as by default).
float16/bfloat16: both lstm_fused.LSTM and nn.LSTM (cuDNN) on the GPU, judged
against a float64 reference computed from the same rounded weights and
inputs: per tensor, our error may be at most 2x nn.LSTM's own error, plus
one rounding of the largest value (a floor for tensors cuDNN gets exact).
Every measured error is appended to ERRORS; tests/cuda_report.py summarises
them. LSTM_FUSED_TEST_DEVICE=cpu runs the same tests on the CPU kernels, a
dry run of this file on a machine without a GPU; LSTM_FUSED_TEST_DEVICE=emu
(with LSTM_FUSED_EMU_LIB, see tests/emu.py and tests/test_cuda_emu.py) runs
them on the CUDA host code and kernels under the CPU emulation of CUDA, with
nn.LSTM on the CPU as the reference in every dtype.
"""
import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from helpers import assert_threads_match_serial, compare, lstm_work, pair
from test_parity import CONFIGS

DEVICE = os.environ.get("LSTM_FUSED_TEST_DEVICE", "cuda")
EMULATED = DEVICE == "emu"
if EMULATED:  # the CUDA code on the emulator: CPU tensors, the ops replaced
    import emu
    emu.load(os.environ["LSTM_FUSED_EMU_LIB"])
    DEVICE = "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA GPU")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA-specific")

HALF = [torch.float16, torch.bfloat16]
ERRORS = []  # dicts: dtype, test, ours, theirs (worst relative errors of a case)
NAMES = ["output", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0"]


def run(module, x, hx=None, device=DEVICE, lengths=None, batch_first=False,
        enforce_sorted=True, dtype=None, round_to=None, seed=1):
    """Forward on `device` (x, hx converted to `dtype`), then backward of a
    loss that touches every output, its random weights rounded to `round_to`
    (default: dtype). Returns outputs and gradients (input, h0, c0, every
    parameter) on the CPU, in float64."""
    dtype = dtype or x.dtype
    round_to = round_to or dtype

    def leaf(t):
        return t.detach().to(device, dtype).clone().requires_grad_(True)

    x = leaf(x)
    hx = None if hx is None else tuple(leaf(h) for h in hx)
    module.zero_grad()
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                   enforce_sorted=enforce_sorted)
    torch.manual_seed(seed)
    out, (h_n, c_n) = module(inp, hx)
    data = out.data if lengths is not None else out
    g = torch.Generator().manual_seed(123)

    def weight(t):  # the same values in every dtype: rounded to `round_to` first
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(round_to).to(t)

    loss = (data * weight(data)).sum() + (h_n * weight(h_n)).sum() + (c_n * weight(c_n)).sum()
    loss.backward()
    grads = [x.grad] + ([h.grad for h in hx] if hx is not None else [])
    grads += [p.grad for p in module.parameters()]
    return [t.detach().double().cpu() if t is not None else None
            for t in [data, h_n, c_n] + grads]


def record(dtype, test, ours, theirs=None):
    """Keep a case's worst relative error (ours, and nn.LSTM's in the same
    dtype where it is the yardstick) for the report."""
    ERRORS.append(dict(dtype=str(dtype).replace("torch.", ""), test=test, ours=ours,
                       theirs=theirs))


def rel_err(a, ref):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return (a - ref).abs().max().item() / scale if ref.numel() else 0.0


def check_same_dtype(cfg_ref, cfg_ours, dtype, name, **kw):
    """fp32/fp64: the GPU result against nn.LSTM on the CPU."""
    expected = run(cfg_ref, device="cpu", **kw)
    got = run(cfg_ours, device=DEVICE, **kw)
    errs = [rel_err(a, b) for a, b in zip(got, expected) if a is not None and b is not None]
    record(dtype, name, max(errs))
    compare([e.to(dtype) if e is not None else None for e in expected],
            [g.to(dtype) if g is not None else None for g in got], dtype)


def cuda_pair(input_size, hidden_size, dtype, seed=0, **kw):
    ref, ours = pair(input_size, hidden_size, dtype, seed=seed, **kw)
    return ref, ours.to(DEVICE)


def batched_input(cfg, T, B, I, dtype, with_hx, H, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if cfg.get("batch_first") else (T, B, I), generator=g,
                    dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
        P = cfg.get("proj_size", 0) or H
        hx = (torch.randn(D, B, P, generator=g, dtype=dtype),
              torch.randn(D, B, H, generator=g, dtype=dtype))
    return x, hx


def test_kernels_registered():
    for op in ("layer_forward", "layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"lstm_fused::{op}", DEVICE.upper()), \
            "lstm_fused was built without CUDA kernels (see README, Building)"


# --- float64 / float32 against nn.LSTM on the CPU ----------------------------------

FULL = [torch.float64, torch.float32]
cfg_id = lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"  # noqa: E731


@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("with_hx", [False, True])
def test_batched(cfg, dtype, with_hx):
    ref, ours = cuda_pair(5, 6, dtype, **cfg)
    x, hx = batched_input(cfg, 7, 4, 5, dtype, with_hx, 6)
    check_same_dtype(ref, ours, dtype, "batched", x=x, hx=hx)


@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["default", "deep"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(cfg, dtype, with_hx):
    ref, ours = cuda_pair(3, 5, dtype, **cfg)
    x = torch.randn(6, 3, dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
        hx = (torch.randn(D, cfg.get("proj_size", 0) or 5, dtype=dtype),
              torch.randn(D, 5, dtype=dtype))
    check_same_dtype(ref, ours, dtype, "unbatched", x=x, hx=hx)


PACKED = [dict(), dict(bidirectional=True), dict(num_layers=2, bidirectional=True, proj_size=2),
          dict(batch_first=True, bias=False)]


@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("cfg", PACKED, ids=["plain", "bidir", "deep-proj", "bf-nobias"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed(cfg, dtype, enforce_sorted, with_hx):
    ref, ours = cuda_pair(4, 5, dtype, **cfg)
    lengths = [9, 6, 6, 3, 1] if enforce_sorted else [3, 9, 1, 6, 6]
    x, hx = batched_input(cfg, max(lengths), len(lengths), 4, dtype, with_hx, 5)
    check_same_dtype(ref, ours, dtype, "packed", x=x, hx=hx, lengths=lengths,
                     batch_first=cfg.get("batch_first", False), enforce_sorted=enforce_sorted)


@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 5), (9, 1)])
def test_edge_sizes(dtype, T, B):
    ref, ours = cuda_pair(3, 4, dtype, num_layers=2, bidirectional=True)
    check_same_dtype(ref, ours, dtype, "edge", x=torch.randn(T, B, 3, dtype=dtype))


# Sizes around the kernels' tiles (32 hidden units, 16 batch rows, 32-wide
# reduction steps): partial tiles, several tiles, a projection over 32.
@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("H,B,proj", [(1, 1, 0), (31, 17, 0), (33, 16, 0), (65, 40, 0),
                                      (40, 33, 37), (70, 3, 33)])
@pytest.mark.parametrize("packed", [False, True])
def test_tile_boundaries(dtype, H, B, proj, packed):
    cfg = dict(bidirectional=True, proj_size=proj)
    ref, ours = cuda_pair(50, H, dtype, **cfg)
    T = 5
    x, hx = batched_input(cfg, T, B, 50, dtype, True, H)
    lengths = None
    if packed:
        g = torch.Generator().manual_seed(B)
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        lengths[0] = T
    check_same_dtype(ref, ours, dtype, "tiles", x=x, hx=hx, lengths=lengths,
                     enforce_sorted=False)


@cuda_only
def test_float32_is_true_float32():
    """TF32 off (torch's default): float32 keeps float32 accuracy at sizes
    where TF32 (10-bit mantissa) would be off by ~1e-3."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref, ours = cuda_pair(256, 256, torch.float32, num_layers=2)
        x = torch.randn(12, 8, 256)
        check_same_dtype(ref, ours, torch.float32, "fp32-large", x=x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@cuda_only
def test_non_contiguous_and_side_stream():
    dtype = torch.float64
    ref, ours = cuda_pair(5, 5, dtype, bidirectional=True)
    big = torch.randn(8, 6, 10, dtype=dtype)
    x = big[::2, 1:5, ::2].transpose(0, 1)
    expected = run(ref, x, device="cpu")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc = big.cuda()[::2, 1:5, ::2].transpose(0, 1)
        assert not xc.is_contiguous()
        got = run(ours, xc, device=DEVICE)
    stream.synchronize()
    compare(expected, got, dtype)


@pytest.mark.skipif(DEVICE != "cuda" and not EMULATED, reason="the CUDA kernels' plan")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("proj", [0, 7])
def test_bidirectional_in_one_launch(dtype, proj, monkeypatch):
    """Both directions of a bidirectional layer share one persistent launch
    (half of the grid each), forward and backward, and give what the
    directions give launched one by one (up to the order of the sums: the
    blocks own other units)."""
    monkeypatch.setenv("LSTM_FUSED_CUDA_ENGINE", "persistent")
    ref, ours = cuda_pair(5, 24, dtype, num_layers=2, bidirectional=True, proj_size=proj)
    x = torch.randn(6, 3, 5, dtype=dtype)
    plan = lstm_fused.cuda_plan(ours, x.to(DEVICE))
    for phase in ("forward", "backward"):
        assert plan[phase].startswith("persistent: 2 directions x 3 blocks x 8 units"), plan
    together = run(ours, x, device=DEVICE)
    monkeypatch.setattr(lstm_fused.ops, "PAIR_DEVICES", set())
    apart = run(ours, x, device=DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(together, apart):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_gradcheck_ops_float64():
    """torch.autograd.gradcheck of the op: packed, reverse, projection, bias."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    H, P, I = 4, 3, 3
    batch_sizes = torch.tensor([3, 3, 2, 1])
    x, h0, c0 = r(9, I), r(3, P), r(3, H)
    w = (r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H))
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: lstm_fused.ops.layer(*a, batch_sizes=batch_sizes, reverse=reverse),
            (x, h0, c0, *w))


def test_dropout_on_cuda():
    ours = lstm_fused.LSTM(4, 5, num_layers=3, dropout=0.5).to(DEVICE).train()
    x = torch.randn(6, 3, 4, device=DEVICE)
    torch.manual_seed(0)
    out = ours(x)[0]
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    ours.eval()
    assert not torch.allclose(out, ours(x)[0])


@pytest.mark.parametrize("dtype", HALF + FULL, ids=str)
def test_dtype_kept(dtype):
    ours = lstm_fused.LSTM(4, 5, proj_size=3).to(DEVICE, dtype)
    out, (h, c) = ours(torch.randn(3, 2, 4, device=DEVICE, dtype=dtype))
    assert out.dtype == h.dtype == c.dtype == dtype


@cuda_only
def test_errors():
    dev = "cuda"
    x, h0, c0 = (torch.randn(6, 3, device=dev), torch.randn(2, 4, device=dev),
                 torch.randn(2, 4, device=dev))
    w_ih, w_hh = torch.randn(16, 3, device=dev), torch.randn(16, 4, device=dev)
    op = torch.ops.lstm_fused.layer_forward
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        op(x, h0, c0, w_ih, w_hh, None, None, None, torch.tensor([2, 2, 2], device=dev), False)
    with pytest.raises(RuntimeError, match="must be on the input's device"):
        op(x, h0, c0, w_ih.cpu(), w_hh, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="support float32, float64, float16 and bfloat16"):
        op(*(t.to(torch.complex64) for t in (x, h0, c0, w_ih, w_hh)), None, None, None, None,
           False)


# --- float16 / bfloat16: at most 2x nn.LSTM's (cuDNN's) error ----------------------

HALF_CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(proj_size=8),
    dict(num_layers=2, bidirectional=True, proj_size=12, batch_first=True),
    dict(bias=False),
    dict(packed=True),
    dict(packed=True, bidirectional=True, num_layers=2, proj_size=8),
    dict(unbatched=True, bidirectional=True),
]


def half_case(cfg, dtype, seed=0, I=24, H=48, T=20, B=6):
    """(fp64 reference, nn.LSTM in dtype on CUDA, ours) results of one case."""
    cfg = dict(cfg)
    packed, unbatched = cfg.pop("packed", False), cfg.pop("unbatched", False)
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, dtype=torch.float64, **cfg)
    # Round the weights to dtype: all three compute from the same values.
    ref.load_state_dict({k: v.to(dtype).double() for k, v in ref.state_dict().items()})
    cudnn = copy.deepcopy(ref).to(DEVICE, dtype)
    ours = lstm_fused.LSTM(I, H, dtype=torch.float64, **cfg)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(DEVICE, dtype)
    x, hx = batched_input(cfg, T, B, I, torch.float64, True, H, seed=seed + 5)
    x = x.to(dtype).double()
    hx = tuple(h.to(dtype).double() for h in hx)
    kw = {}
    if unbatched:
        x, hx = x[:, 0], tuple(h[:, 0] for h in hx)
    if packed:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        lengths[0] = T
        kw = dict(lengths=lengths, enforce_sorted=False,
                  batch_first=cfg.get("batch_first", False))
    expected = run(ref, x, hx, device="cpu", round_to=dtype, **kw)
    theirs = run(cudnn, x, hx, dtype=dtype, **kw)
    ours_r = run(ours, x, hx, dtype=dtype, **kw)
    return expected, theirs, ours_r


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cfg", HALF_CONFIGS, ids=cfg_id)
def test_half_within_2x_cudnn_error(cfg, dtype):
    expected, theirs, ours = half_case(cfg, dtype)
    floor = torch.finfo(dtype).eps / 2  # one rounding, relative to the largest value
    bad = []
    worst_ours, worst_theirs = 0.0, 0.0
    for k, (e, t, o) in enumerate(zip(expected, theirs, ours)):
        if e is None:
            continue
        eo, et = rel_err(o, e), rel_err(t, e)
        worst_ours, worst_theirs = max(worst_ours, eo), max(worst_theirs, et)
        assert torch.isfinite(o).all()
        if eo > 2 * et + floor:
            name = NAMES[k] if k < len(NAMES) else f"grad_param{k - len(NAMES)}"
            bad.append(f"{name}: ours {eo:.3g} > 2 x nn.LSTM {et:.3g} + {floor:.3g}")
    record(dtype, "half-" + cfg_id(cfg), worst_ours, worst_theirs)
    assert not bad, "; ".join(bad)


@cuda_only
def test_memory_flat_over_many_calls():
    """2,000 forward+backward calls leave torch.cuda.memory_allocated where the
    warm-up left it: nothing a call allocates outlives it."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(8, 32, num_layers=2, bidirectional=True, proj_size=16).to(DEVICE)
    x = torch.randn(10, 4, 8, device=DEVICE, requires_grad=True)

    def step():
        out, (h, c) = m(x)
        (out.sum() + h.sum() + c.sum()).backward()
        m.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(2000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@cuda_only
def test_four_threads_match_serial_bitwise():
    """Forward and backward from 4 Python threads at once, as in serial."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(5, 8, num_layers=2, bidirectional=True).to(DEVICE)
    inputs = [torch.randn(20, 3, 5, generator=torch.Generator().manual_seed(k)).to(DEVICE)
              for k in range(4)]
    assert_threads_match_serial(lstm_work(m), inputs, rounds=3)
