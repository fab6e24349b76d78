"""Parity with torch.nn.LSTM: outputs, (h_n, c_n) and every gradient."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import compare, pair, run, run_packed

DTYPES = [torch.float64, torch.float32]

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(num_layers=3, bidirectional=True),
    dict(bidirectional=True),
    dict(bias=False),
    dict(proj_size=3),
    dict(proj_size=4, num_layers=2, bidirectional=True),
    dict(batch_first=True),
    dict(batch_first=True, bidirectional=True, num_layers=2, proj_size=2, bias=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("with_hx", [False, True])
def test_batched(cfg, dtype, with_hx):
    ref, ours = pair(5, 6, dtype, **cfg)
    T, B = 7, 4
    x = torch.randn((B, T, 5) if cfg.get("batch_first") else (T, B, 5), dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
        P = cfg.get("proj_size", 0) or 6
        hx = (torch.randn(D, B, P, dtype=dtype), torch.randn(D, B, 6, dtype=dtype))
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["default", "deep"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(cfg, dtype, with_hx):
    ref, ours = pair(3, 5, dtype, **cfg)
    x = torch.randn(6, 3, dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
        hx = (torch.randn(D, cfg.get("proj_size", 0) or 5, dtype=dtype),
              torch.randn(D, 5, dtype=dtype))
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(bidirectional=True), dict(num_layers=2, bidirectional=True, proj_size=2),
                                 dict(batch_first=True, bias=False)], ids=["plain", "bidir", "deep-proj", "bf-nobias"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed(cfg, dtype, enforce_sorted, with_hx):
    ref, ours = pair(4, 5, dtype, **cfg)
    lengths = [9, 6, 6, 3, 1] if enforce_sorted else [3, 9, 1, 6, 6]
    B, T = len(lengths), max(lengths)
    bf = cfg.get("batch_first", False)
    x = torch.randn((B, T, 4) if bf else (T, B, 4), dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1)
        hx = (torch.randn(D, B, cfg.get("proj_size", 0) or 5, dtype=dtype),
              torch.randn(D, B, 5, dtype=dtype))
    a = run_packed(ref, x, lengths, hx, batch_first=bf, enforce_sorted=enforce_sorted)
    b = run_packed(ours, x, lengths, hx, batch_first=bf, enforce_sorted=enforce_sorted)
    compare(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 5), (9, 1)])
def test_edge_sizes(dtype, T, B):
    ref, ours = pair(3, 4, dtype, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, 3, dtype=dtype)
    compare(run(ref, x, None), run(ours, x, None), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(dtype):
    ref, ours = pair(5, 5, dtype, bidirectional=True)
    big = torch.randn(8, 6, 10, dtype=dtype)
    x = big[::2, 1:5, ::2].transpose(0, 1)  # strided and transposed view
    assert not x.is_contiguous()
    compare(run(ref, x, None), run(ours, x, None), dtype)
    hx = torch.randn(4, 2, 5, dtype=dtype).transpose(1, 0)[:, :6]  # [2, 4, 5] non-contiguous
    cx = torch.randn(2, 4, 10, dtype=dtype)[..., ::2]
    compare(run(ref, x, (hx, cx)), run(ours, x, (hx, cx)), dtype)


def test_dropout_training_matches_nn_lstm():
    """Same seed, same mask: dropout between layers consumes the RNG as nn.LSTM does."""
    dtype = torch.float64
    ref, ours = pair(4, 5, dtype, num_layers=3, dropout=0.4, bidirectional=True)
    ref.train(), ours.train()
    x = torch.randn(6, 3, 4, dtype=dtype)
    compare(run(ref, x, None, seed=7), run(ours, x, None, seed=7), dtype)
    # and it really drops something: train differs from eval
    torch.manual_seed(7)
    train_out = ours(x)[0]
    ours.eval()
    assert not torch.allclose(train_out, ours(x)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_mode(dtype):
    ref, ours = pair(4, 5, dtype, num_layers=2, dropout=0.5)
    ref.eval(), ours.eval()
    x = torch.randn(5, 2, 4, dtype=dtype)
    compare(run(ref, x, None), run(ours, x, None), dtype)
    with torch.no_grad():
        a, (h1, c1) = ref(x)
        b, (h2, c2) = ours(x)
    assert not b.requires_grad
    for u, v in [(a, b), (h1, h2), (c1, c2)]:
        torch.testing.assert_close(v, u, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(layers=st.integers(1, 3), bidir=st.booleans(), bias=st.booleans(),
       batch_first=st.booleans(), proj=st.integers(0, 3), T=st.integers(1, 6),
       B=st.integers(1, 4), I=st.integers(1, 6), H=st.integers(4, 7),
       packed=st.booleans(), unsorted=st.booleans(), dtype=st.sampled_from(DTYPES),
       with_hx=st.booleans())
def test_random_grid(layers, bidir, bias, batch_first, proj, T, B, I, H, packed, unsorted,
                     dtype, with_hx):
    cfg = dict(num_layers=layers, bidirectional=bidir, bias=bias, batch_first=batch_first,
               proj_size=proj)
    ref, ours = pair(I, H, dtype, **cfg)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    hx = None
    if with_hx:
        D = (2 if bidir else 1) * layers
        hx = (torch.randn(D, B, proj or H, dtype=dtype), torch.randn(D, B, H, dtype=dtype))
    if packed:
        g = torch.Generator().manual_seed(T * 31 + B)
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        lengths[0] = T
        if not unsorted:
            lengths.sort(reverse=True)
        a = run_packed(ref, x, lengths, hx, batch_first=batch_first, enforce_sorted=not unsorted)
        b = run_packed(ours, x, lengths, hx, batch_first=batch_first, enforce_sorted=not unsorted)
    else:
        a, b = run(ref, x, hx), run(ours, x, hx)
    compare(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_on_cpu_run_in_float32(dtype):
    ref, ours = pair(4, 5, torch.float32, num_layers=2)
    x = torch.randn(6, 3, 4)
    expected = ref(x)[0]
    ours = ours.to(dtype)
    out, (h, c) = ours(x.to(dtype))
    assert out.dtype == h.dtype == c.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_parametrized_and_reassigned_weights():
    """Weights read per call: a parametrization (weight_norm) and a parameter
    replaced after construction are both used, as in nn.LSTM."""
    from torch import nn
    from torch.nn.utils import parametrizations
    dtype = torch.float64
    ref, ours = pair(4, 5, dtype, num_layers=2)
    for m in (ref, ours):
        parametrizations.weight_norm(m, "weight_hh_l0")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4, dtype=dtype)
    compare(run(ref, x, None), run(ours, x, None), dtype)
    w = torch.randn_like(ref.weight_ih_l1)
    ref.weight_ih_l1 = nn.Parameter(w.clone())
    ours.weight_ih_l1 = nn.Parameter(w.clone())
    compare(run(ref, x, None), run(ours, x, None), dtype)
