"""Bad input: lstm_fused.LSTM raises what nn.LSTM raises (same type, same
message) before any of our kernels runs, and returns what nn.LSTM returns
where nn.LSTM accepts odd input; direct op calls get a clear RuntimeError."""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from helpers import TOL, pair

F32, F64 = torch.float32, torch.float64


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the module's calls of our fused layer."""
    calls = []
    real = lstm_fused.modules.ops.layer
    monkeypatch.setattr(lstm_fused.modules.ops, "layer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def flat(result):
    """Tensors of a module result: output (or packed fields), h_n, c_n."""
    out, (h, c) = result
    if isinstance(out, PackedSequence):
        return [out.data, out.batch_sizes, out.sorted_indices, out.unsorted_indices, h, c]
    return [out, h, c]


def same_as_nn(ref, ours, *args, seed=0):
    """Calls both modules; asserts the same exception (exact type and message)
    or results close within the dtype's tolerance. Returns the exception."""
    try:
        torch.manual_seed(seed)
        expected = ref(*args)
    except Exception as exc:  # noqa: BLE001  (any exception nn.LSTM raises)
        torch.manual_seed(seed)
        with pytest.raises(type(exc), match=re.escape(str(exc))) as info:
            ours(*args)
        assert type(info.value) is type(exc)
        return exc
    torch.manual_seed(seed)
    actual = ours(*args)
    a, b = flat(actual), flat(expected)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is None:
            continue
        assert u.shape == v.shape and u.dtype == v.dtype and u.device == v.device
        if u.is_floating_point() and u.device.type != "meta":
            torch.testing.assert_close(u, v, **TOL.get(v.dtype, dict(rtol=1e-5, atol=1e-5)))
        elif u.device.type != "meta":
            assert torch.equal(u, v)
    return None


def both(cfg, dtype=F32):
    return pair(cfg.pop("input_size", 3), cfg.pop("hidden_size", 4), dtype, **cfg)


X = lambda *s, dtype=F32, **k: torch.randn(*s, dtype=dtype, **k)  # noqa: E731
Z = lambda *s, dtype=F32, **k: torch.zeros(*s, dtype=dtype, **k)  # noqa: E731


def packed(lengths=(5, 3, 2), sorted=True, dtype=F32, width=3):
    lengths = list(lengths) if sorted else list(lengths)[::-1]
    return pack_padded_sequence(X(max(lengths), len(lengths), width, dtype=dtype), lengths,
                                enforce_sorted=sorted)


# (id, module config, input, hx); hx None means no hx argument.
BAD_CALLS = [
    ("input-size", {}, lambda: X(5, 2, 4), None),
    ("input-size-unbatched", {}, lambda: X(5, 2), None),
    ("input-1d", {}, lambda: X(3), None),
    ("input-0d", {}, lambda: torch.tensor(1.0), None),
    ("input-4d", {}, lambda: X(1, 5, 2, 3), None),
    ("input-not-tensor", {}, lambda: [[1.0, 2.0, 3.0]], None),
    ("input-int", {}, lambda: torch.ones(5, 2, 3, dtype=torch.long), None),
    ("input-bool", {}, lambda: torch.ones(5, 2, 3, dtype=torch.bool), None),
    ("input-f64-model-f32", {}, lambda: X(5, 2, 3, dtype=F64), None),
    ("input-f16-model-f32", {}, lambda: X(5, 2, 3).half(), None),
    ("input-complex", {}, lambda: X(5, 2, 3).to(torch.complex64), None),
    ("hx-dim0", {}, lambda: X(5, 2, 3), lambda: (Z(2, 2, 4), Z(1, 2, 4))),
    ("hx-dim1", {}, lambda: X(5, 2, 3), lambda: (Z(1, 3, 4), Z(1, 2, 4))),
    ("hx-dim2", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 5), Z(1, 2, 4))),
    ("cx-dim0", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(2, 2, 4))),
    ("cx-dim1", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(1, 1, 4))),
    ("cx-dim2", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(1, 2, 3))),
    ("hx-proj", dict(hidden_size=5, proj_size=2), lambda: X(5, 2, 3),
     lambda: (Z(1, 2, 5), Z(1, 2, 5))),
    ("cx-proj", dict(hidden_size=5, proj_size=2), lambda: X(5, 2, 3),
     lambda: (Z(1, 2, 2), Z(1, 2, 2))),
    ("hx-bidir", dict(bidirectional=True, num_layers=2), lambda: X(5, 2, 3),
     lambda: (Z(2, 2, 4), Z(4, 2, 4))),
    ("hx-batch-first", dict(batch_first=True), lambda: X(5, 2, 3),
     lambda: (Z(1, 2, 4), Z(1, 2, 4))),
    ("hx-unbatched-dim", {}, lambda: X(5, 3), lambda: (Z(1, 5), Z(1, 4))),
    ("hx-f64", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4, dtype=F64), Z(1, 2, 4))),
    ("cx-f64", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(1, 2, 4, dtype=F64))),
    ("hx-f32-model-f64", dict(dtype=F64), lambda: X(5, 2, 3, dtype=F64),
     lambda: (Z(1, 2, 4), Z(1, 2, 4))),
    ("hx-int", {}, lambda: X(5, 2, 3),
     lambda: (Z(1, 2, 4, dtype=torch.long), Z(1, 2, 4, dtype=torch.long))),
    ("batched-input-unbatched-hx", {}, lambda: X(5, 2, 3), lambda: (Z(1, 4), Z(1, 4))),
    ("unbatched-input-batched-hx", {}, lambda: X(5, 3), lambda: (Z(1, 1, 4), Z(1, 1, 4))),
    ("mixed-hx-dims", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(1, 4))),
    ("hx-tuple-1", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4),)),
    ("hx-tuple-3", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4),) * 3),
    ("hx-tensor", {}, lambda: X(5, 2, 3), lambda: Z(1, 2, 4)),
    ("hx-stacked-tensor", {}, lambda: X(5, 2, 3), lambda: Z(2, 1, 2, 4)),
    ("hx-nones", {}, lambda: X(5, 2, 3), lambda: (None, None)),
    ("hx-meta", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4, device="meta"), Z(1, 2, 4))),
    ("cx-meta", {}, lambda: X(5, 2, 3), lambda: (Z(1, 2, 4), Z(1, 2, 4, device="meta"))),
    ("input-meta", {}, lambda: X(5, 2, 3, device="meta"), None),
    ("seq-len-0", {}, lambda: X(0, 2, 3), None),
    ("seq-len-0-batch-first", dict(batch_first=True), lambda: X(2, 0, 3), None),
    ("seq-len-0-unbatched", {}, lambda: X(0, 3), None),
    ("seq-len-0-hx", {}, lambda: X(0, 2, 3), lambda: (Z(1, 2, 4), Z(1, 2, 4))),
    ("seq-and-batch-0", {}, lambda: X(0, 0, 3), None),
    ("packed-input-size", dict(input_size=4), lambda: packed(), None),
    ("packed-input-dtype", dict(dtype=F64), lambda: packed(), None),
    ("packed-hx-f64", {}, lambda: packed(), lambda: (Z(1, 3, 4, dtype=F64), Z(1, 3, 4))),
    ("packed-hx-tuple-1", {}, lambda: packed(), lambda: (Z(1, 3, 4),)),
    ("packed-hx-tuple-1-unsorted", {}, lambda: packed(sorted=False), lambda: (Z(1, 3, 4),)),
    ("packed-hx-tuple-3", {}, lambda: packed(), lambda: (Z(1, 3, 4),) * 3),
    ("packed-hx-meta", {}, lambda: packed(), lambda: (Z(1, 3, 4, device="meta"), Z(1, 3, 4))),
]
# A PackedSequence built by hand (torch says never to) with a bad batch_sizes.
BAD_CALLS += [
    ("batch-sizes-empty", {}, lambda: PackedSequence(X(0, 3), torch.tensor([], dtype=torch.long)), None),
    ("batch-sizes-float", {}, lambda: PackedSequence(X(6, 3), torch.tensor([3.0, 2.0, 1.0])), None),
    ("batch-sizes-2d", {}, lambda: PackedSequence(X(6, 3), torch.tensor([[3, 2, 1]])), None),
]


@pytest.mark.parametrize("name,cfg,make_input,make_hx", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_same_as_nn(name, cfg, make_input, make_hx, kernel_calls):
    cfg = dict(cfg)
    dtype = cfg.pop("dtype", F32)
    ref, ours = both(cfg, dtype)
    torch.manual_seed(1)
    x = make_input()
    args = (x,) if make_hx is None else (x, make_hx())
    exc = same_as_nn(ref, ours, *args)
    if exc is not None:
        assert not kernel_calls, "a kernel ran before the error"


def hx_msg(which, expected, got):
    return re.escape(f"Expected hidden[{which}] size {expected}, got {got}")


# Where nn.LSTM checks nothing in Python and its kernels give incidental errors
# ("The size of tensor a (2) must match ...", "got an incorrect number of RNN
# parameters"), accept bad input silently, or crash (a 4-D c0 with a
# PackedSequence segfaults torch 2.13), we raise a clear error instead: for
# hx, nn.LSTM's own message for padded input; for batch_sizes, the op's.
# (id, config, input, hx, exception type, message pattern)
OWN_ERRORS = [
    ("packed-hx-batch", {}, lambda: packed(), lambda: (Z(1, 2, 4), Z(1, 2, 4)),
     RuntimeError, hx_msg(0, (1, 3, 4), [1, 2, 4])),
    ("packed-hx-batch-unsorted", {}, lambda: packed(sorted=False),  # nn.LSTM runs it
     lambda: (Z(1, 4, 4), Z(1, 4, 4)), RuntimeError, hx_msg(0, (1, 3, 4), [1, 4, 4])),
    ("packed-hx-size", {}, lambda: packed(), lambda: (Z(1, 3, 5), Z(1, 3, 4)),
     RuntimeError, hx_msg(0, (1, 3, 4), [1, 3, 5])),
    ("packed-cx-size", {}, lambda: packed(), lambda: (Z(1, 3, 4), Z(1, 3, 5)),
     RuntimeError, hx_msg(1, (1, 3, 4), [1, 3, 5])),
    ("packed-hx-layers", {}, lambda: packed(), lambda: (Z(2, 3, 4), Z(2, 3, 4)),
     RuntimeError, hx_msg(0, (1, 3, 4), [2, 3, 4])),
    ("packed-hx-2d", {}, lambda: packed(), lambda: (Z(3, 4), Z(3, 4)),
     RuntimeError, hx_msg(0, (1, 3, 4), [3, 4])),
    ("packed-cx-4d-crashes-nn", dict(input_size=2, hidden_size=5, proj_size=1, num_layers=2,
                                     bidirectional=True),
     lambda: PackedSequence(X(5, 2), torch.tensor([2, 1, 1, 1])),
     lambda: (Z(4, 2, 1), Z(1, 4, 2, 5)), RuntimeError, hx_msg(1, (4, 2, 5), [1, 4, 2, 5])),
]
for name, sizes, rows, msg in [
        ("increasing", [1, 2, 3], 6, "positive and non-increasing"),
        ("zero", [3, 0, 2], 5, "positive and non-increasing"),
        ("negative", [3, -1], 2, "positive and non-increasing"),
        ("sum-short", [3, 2, 1], 5, "sum to 6 but x has 5 rows"),
        ("sum-long", [3, 2, 1], 8, "sum to 6 but x has 8 rows"),  # nn.LSTM runs it
        ("int32", [3, 2, 1], 6, "must be a 1-D int64 CPU tensor")]:
    OWN_ERRORS.append((
        f"batch-sizes-{name}", {},
        lambda s=sizes, r=rows, d=torch.int32 if name == "int32" else torch.long:
        PackedSequence(X(r, 3), torch.tensor(s, dtype=d)), None, RuntimeError, "lstm_fused: batch_sizes .*" + msg))


@pytest.mark.parametrize("name,cfg,make_input,make_hx,exc_type,msg", OWN_ERRORS,
                         ids=[c[0] for c in OWN_ERRORS])
def test_bad_call_clear_error_where_nn_has_none(name, cfg, make_input, make_hx, exc_type, msg):
    ours = lstm_fused.LSTM(**dict(dict(input_size=3, hidden_size=4), **cfg))
    args = (make_input(),) if make_hx is None else (make_input(), make_hx())
    with pytest.raises(exc_type, match=msg) as info:
        ours(*args)
    assert type(info.value) is exc_type


def test_empty_batch_matches_nn_with_gradients():
    """nn.LSTM returns empty outputs for batch 0 (and zero weight gradients)."""
    ref, ours = pair(3, 4, F64, num_layers=2, bidirectional=True)
    for m in (ref, ours):
        x = torch.randn(5, 0, 3, dtype=F64, requires_grad=True)
        out, (h, c) = m(x)
        assert out.shape == (5, 0, 8) and h.shape == c.shape == (4, 0, 4)
        (out.sum() + h.sum() + c.sum()).backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


CTOR_ARGS = [
    dict(input_size=0, hidden_size=4), dict(input_size=3, hidden_size=0),
    dict(input_size=-1, hidden_size=4), dict(input_size=3, hidden_size=4, num_layers=0),
    dict(input_size=3.0, hidden_size=4), dict(input_size=3, hidden_size="4"),
    dict(input_size=3, hidden_size=4, num_layers=1.5),
    dict(input_size=3, hidden_size=4, dropout=1.5), dict(input_size=3, hidden_size=4, dropout=-0.1),
    dict(input_size=3, hidden_size=4, dropout=True), dict(input_size=3, hidden_size=4, dropout="0.1"),
    dict(input_size=3, hidden_size=4, proj_size=-1), dict(input_size=3, hidden_size=4, proj_size=4),
    dict(input_size=3, hidden_size=4, proj_size=5), dict(input_size=3, hidden_size=4, bias=1),
    dict(input_size=3, hidden_size=4, batch_first="yes"),
    dict(input_size=3, hidden_size=4, nonsense=1), dict(input_size=3),
]


@pytest.mark.parametrize("kw", CTOR_ARGS, ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_constructor_errors_same_as_nn(kw):
    with pytest.raises(Exception) as ref_info:
        nn.LSTM(**kw)
    exc = ref_info.value
    with pytest.raises(type(exc), match=re.escape(str(exc))) as info:
        lstm_fused.LSTM(**kw)
    assert type(info.value) is type(exc)


def test_constructor_dropout_warning_same_as_nn():
    with pytest.warns(UserWarning) as ref_w:
        nn.LSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning) as our_w:
        lstm_fused.LSTM(3, 4, dropout=0.5)
    assert [str(w.message) for w in our_w] == [str(w.message) for w in ref_w]


def test_bad_input_to_meta_module_same_as_nn():
    """Weights on another device than the input (meta stands in for a GPU)."""
    ref, ours = pair(3, 4, F32)
    ref, ours = ref.to("meta"), ours.to("meta")
    exc = same_as_nn(ref, ours, X(5, 2, 3))
    assert exc is not None and "same device" in str(exc)


# ---------------------------------------------------------------- fuzzing

@st.composite
def calls(draw):
    """A module configuration and a call, valid or not."""
    H = draw(st.integers(1, 5))
    cfg = dict(input_size=draw(st.integers(1, 4)), hidden_size=H,
               num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
               batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
               proj_size=draw(st.sampled_from([0, 0, 1, H - 1, H])),  # H is invalid
               dropout=draw(st.sampled_from([0.0, 0.0, 0.3])))
    dtype = draw(st.sampled_from([F64, F32]))
    train = draw(st.booleans())
    I, L = cfg["input_size"], cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
    P = cfg["proj_size"] or H
    T, B = draw(st.integers(0, 4)), draw(st.integers(0, 3))
    # input: padded, unbatched or packed; maybe wrong width, dims or dtype
    kind = draw(st.sampled_from(["padded", "padded", "unbatched", "packed", "bad-dims"]))
    width = I + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    x_dtype = draw(st.sampled_from([dtype] * 6 + [F32, F64, torch.long]))
    strided = draw(st.booleans())
    lengths = enforce_sorted = None
    if kind == "packed":
        B, T = max(B, 1), max(T, 1)
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        lengths[draw(st.integers(0, B - 1))] = T
        enforce_sorted = draw(st.booleans())
        if enforce_sorted:
            lengths.sort(reverse=True)
    if kind == "unbatched":
        shape = [T, max(width, 0)]
    elif kind == "bad-dims":
        shape = draw(st.sampled_from([[max(width, 0)], [1, T, B, max(width, 0)]]))
    else:
        shape = [B, T, max(width, 0)] if cfg["batch_first"] else [T, B, max(width, 0)]
    # hx: none, valid, or broken in one way
    hx_kind = draw(st.sampled_from(["none", "valid", "valid", "dim", "ndim", "dtype",
                                    "len1", "len3", "meta"]))
    hx_dim = draw(st.integers(0, 2))
    hx_delta = draw(st.sampled_from([1, -1]))
    return dict(cfg=cfg, dtype=dtype, train=train, shape=shape, x_dtype=x_dtype,
                strided=strided, kind=kind, lengths=lengths, enforce_sorted=enforce_sorted,
                hx_kind=hx_kind, hx_dim=hx_dim, hx_delta=hx_delta, L=L, P=P, B=B)


def make_hx(c, gen):
    unbatched = c["kind"] == "unbatched"
    hs = [[c["L"], c["B"], c["P"]], [c["L"], c["B"], c["cfg"]["hidden_size"]]]
    if unbatched:
        hs = [[s[0], s[2]] for s in hs]
    k = c["hx_kind"]
    dtypes = [c["dtype"], c["dtype"]]
    which = c["hx_dim"] % 2
    if k == "dim":
        d = c["hx_dim"] % len(hs[which])
        hs[which][d] = max(0, hs[which][d] + c["hx_delta"])
    elif k == "ndim":
        hs[which] = hs[which][1:] if c["hx_delta"] < 0 else [1] + hs[which]
    elif k == "dtype":
        dtypes[which] = F32 if c["dtype"] == F64 else F64
    hx = [torch.randn(s, dtype=d, generator=gen) for s, d in zip(hs, dtypes)]
    if k == "meta":
        hx[which] = hx[which].to("meta")
    if k == "len1":
        hx = hx[:1]
    elif k == "len3":
        hx = hx + hx[:1]
    return tuple(hx)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(c=calls())
def test_fuzz_same_as_nn(c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer; oneDNN notes
        try:
            torch.manual_seed(0)
            ref = nn.LSTM(**c["cfg"], dtype=c["dtype"])
        except Exception as exc:  # noqa: BLE001
            with pytest.raises(type(exc), match=re.escape(str(exc))):
                lstm_fused.LSTM(**c["cfg"], dtype=c["dtype"])
            return
        ours = lstm_fused.LSTM(**c["cfg"], dtype=c["dtype"])
        ours.load_state_dict(ref.state_dict())
        ref.train(c["train"]), ours.train(c["train"])
        gen = torch.Generator().manual_seed(0)
        shape = list(c["shape"])
        if c["strided"] and shape:  # every other element of the last dim, then transposed
            big = torch.randn(shape[:-1] + [2 * shape[-1]], generator=gen)
            x = big[..., ::2]
            if x.dim() >= 2:
                x = x.transpose(0, 1).contiguous().transpose(0, 1)
        else:
            x = torch.randn(shape, generator=gen)
        x = x.to(c["x_dtype"]) if c["x_dtype"] != torch.long else (x * 3).long()
        if c["kind"] == "packed":
            x = pack_padded_sequence(x, c["lengths"], batch_first=c["cfg"]["batch_first"],
                                     enforce_sorted=c["enforce_sorted"])
        args = (x,) if c["hx_kind"] == "none" else (x, make_hx(c, gen))
        if c["kind"] == "packed" and c["hx_kind"] in ("dim", "ndim"):
            # nn.LSTM may crash here (see OWN_ERRORS); we raise its padded-input message
            with pytest.raises(RuntimeError, match=re.escape("Expected hidden[")):
                ours(*args)
            return
        same_as_nn(ref, ours, *args)


# ---------------------------------------------------------- direct op calls

B_, T_, I_, H_, P_ = 2, 3, 4, 5, 3


def fwd_args(proj=False, bias=True, dtype=F64, packed_sizes=None):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    P = P_ if proj else H_
    rows = sum(packed_sizes) if packed_sizes else T_ * B_
    return dict(x=r(rows, I_), h0=r(B_, P), c0=r(B_, H_), w_ih=r(4 * H_, I_), w_hh=r(4 * H_, P),
                b_ih=r(4 * H_) if bias else None, b_hh=r(4 * H_) if bias else None,
                w_hr=r(P_, H_) if proj else None,
                batch_sizes=torch.tensor(packed_sizes) if packed_sizes else None, reverse=False)


def bwd_args(**kw):
    a = fwd_args(**kw)
    y, h_n, c_n, gates, cells = torch.ops.lstm_fused.layer_forward(**a)
    return dict(grad_y=torch.randn_like(y), grad_h_n=torch.randn_like(h_n),
                grad_c_n=torch.randn_like(c_n), x=a["x"], h0=a["h0"], c0=a["c0"],
                w_ih=a["w_ih"], w_hh=a["w_hh"], w_hr=a["w_hr"], batch_sizes=a["batch_sizes"],
                reverse=False, has_bias=a["b_ih"] is not None, y=y, gates=gates, cells=cells)


bs = lambda *v, dtype=torch.long: torch.tensor(v, dtype=dtype)  # noqa: E731
# (id, changes to the forward arguments, message pattern)
BAD_FWD = [
    ("x-1d", dict(x=X(6, dtype=F64)), "x must be 2-D"),
    ("x-3d", dict(x=X(3, 2, 4, dtype=F64)), "x must be 2-D"),
    ("h0-1d", dict(h0=X(5, dtype=F64)), "h0 and c0 must be 2-D"),
    ("c0-3d", dict(c0=X(1, 2, 5, dtype=F64)), "h0 and c0 must be 2-D"),
    ("w_ih-rows", dict(w_ih=X(19, 4, dtype=F64)), r"w_ih must be \[4\*hidden_size"),
    ("w_ih-empty", dict(w_ih=X(0, 4, dtype=F64)), r"w_ih must be \[4\*hidden_size"),
    ("w_ih-1d", dict(w_ih=X(20, dtype=F64)), r"w_ih must be \[4\*hidden_size"),
    ("w_ih-cols", dict(w_ih=X(20, 3, dtype=F64)), "w_ih must have shape"),
    ("w_hh", dict(w_hh=X(20, 4, dtype=F64)), "w_hh must have shape"),
    ("h0-width", dict(h0=X(2, 4, dtype=F64)), "h0 must have shape"),
    ("c0-width", dict(c0=X(2, 4, dtype=F64)), "c0 must have shape"),
    ("c0-batch", dict(c0=X(3, 5, dtype=F64)), "c0 must have shape"),
    ("b_ih", dict(b_ih=X(19, dtype=F64)), "b_ih must have shape"),
    ("b_hh-2d", dict(b_hh=X(1, 20, dtype=F64)), "b_hh must have shape"),
    ("w_hr-no-fit", dict(w_hr=X(3, 4, dtype=F64)), "must have shape"),
    ("w_hr-1d", dict(w_hr=X(5, dtype=F64)), "w_hr must"),
    ("w_hr-0d", dict(w_hr=torch.tensor(1.0, dtype=F64)), "w_hr must"),
    ("x-rows", dict(x=X(7, 4, dtype=F64)), "not a positive multiple"),
    ("x-empty", dict(x=X(0, 4, dtype=F64)), "not a positive multiple"),
    ("batch-0", dict(h0=X(0, 5, dtype=F64), c0=X(0, 5, dtype=F64)), "batch size must be positive"),
    ("w_hh-f32", dict(w_hh=X(20, 5)), "w_hh must have dtype Double"),
    ("h0-f32", dict(h0=X(2, 5)), "h0 must have dtype Double"),
    ("b_ih-f32", dict(b_ih=X(20)), "b_ih must have dtype Double"),
    ("int64", dict(x=torch.ones(6, 4, dtype=torch.long), h0=torch.ones(2, 5, dtype=torch.long),
                   c0=torch.ones(2, 5, dtype=torch.long), w_ih=torch.ones(20, 4, dtype=torch.long),
                   w_hh=torch.ones(20, 5, dtype=torch.long), b_ih=None, b_hh=None),
     "support float32 and float64"),
    ("bs-int32", dict(batch_sizes=bs(2, 2, 2, dtype=torch.int32)), "1-D int64 CPU"),
    ("bs-float", dict(batch_sizes=bs(2.0, 2.0, 2.0, dtype=F32)), "1-D int64 CPU"),
    ("bs-2d", dict(batch_sizes=bs(2, 2, 2).view(1, 3)), "1-D int64 CPU"),
    ("bs-empty", dict(batch_sizes=bs(dtype=torch.long)), "must not be empty"),
    ("bs-first", dict(batch_sizes=bs(1, 1, 1, 1, 1, 1)), r"batch_sizes\[0\] \(1\) must equal"),
    ("bs-increasing", dict(batch_sizes=bs(2, 1, 2, 1)), "non-increasing"),
    ("bs-zero", dict(batch_sizes=bs(2, 2, 0, 2)), "positive and non-increasing"),
    ("bs-negative", dict(batch_sizes=bs(2, 2, 2, -1, 1)), "positive and non-increasing"),
    ("bs-sum-short", dict(batch_sizes=bs(2, 2, 1)), "sum to 5 but x has 6 rows"),
    ("bs-sum-long", dict(batch_sizes=bs(2, 2, 2, 1)), "sum to 7 but x has 6 rows"),
]


@pytest.mark.parametrize("name,change,msg", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_op_forward_bad_args(name, change, msg):
    a = fwd_args()
    a.update(change)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.lstm_fused.layer_forward(**a)


BAD_BWD = [
    ("grad_y", dict(grad_y=X(6, 4, dtype=F64)), "grad_y must have shape"),
    ("grad_h_n", dict(grad_h_n=X(3, 5, dtype=F64)), "grad_h_n must have shape"),
    ("grad_c_n-f32", dict(grad_c_n=X(2, 5)), "grad_c_n must have the dtype"),
    ("y", dict(y=X(5, 5, dtype=F64)), "y must have shape"),
    ("gates", dict(gates=X(6, 5, dtype=F64)), "gates must have shape"),
    ("cells-f32", dict(cells=X(6, 5)), "cells must have the dtype"),
    ("x", dict(x=X(6, 3, dtype=F64)), "w_ih must have shape"),
    ("bs", dict(batch_sizes=bs(2, 2, 1)), "sum to 5"),
    ("w_hr", dict(w_hr=X(3, 5, dtype=F64)), "w_hh must have shape"),
]


@pytest.mark.parametrize("name,change,msg", BAD_BWD, ids=[c[0] for c in BAD_BWD])
def test_op_backward_bad_args(name, change, msg):
    a = bwd_args()
    a.update(change)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.lstm_fused.layer_backward(**a)


@pytest.mark.parametrize("arg", ["w_ih", "h0", "batch_sizes"])
def test_op_mixed_devices_refused(arg):
    a = fwd_args(packed_sizes=[2, 2, 2])
    a[arg] = a[arg].to("meta")
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.lstm_fused.layer_forward(**a)


def non_contiguous(t):
    """The same values, every other element of a larger tensor."""
    big = torch.zeros(*t.shape, 2, dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


@pytest.mark.parametrize("proj", [False, True])
def test_op_non_contiguous_args_give_the_same_bits(proj):
    a = fwd_args(proj=proj, packed_sizes=[2, 2, 1])
    expected = torch.ops.lstm_fused.layer_forward(**a)
    for name in ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "batch_sizes"]:
        if a[name] is None:
            continue
        b = dict(a, **{name: non_contiguous(a[name])})
        assert not b[name].is_contiguous() or a[name].numel() <= 1
        for u, v in zip(torch.ops.lstm_fused.layer_forward(**b), expected):
            assert torch.equal(u, v), name
    g = bwd_args(proj=proj, packed_sizes=[2, 2, 1])
    expected = torch.ops.lstm_fused.layer_backward(**g)
    for name in ["grad_y", "grad_h_n", "grad_c_n", "x", "h0", "c0", "w_ih", "w_hh", "w_hr",
                 "y", "gates", "cells"]:
        if g[name] is None:
            continue
        b = dict(g, **{name: non_contiguous(g[name])})
        for u, v in zip(torch.ops.lstm_fused.layer_backward(**b), expected):
            assert torch.equal(u, v), name


def test_op_backward_without_output_grads():
    """Absent grads count as zeros."""
    a = bwd_args()
    zeros = {k: torch.zeros_like(a[k]) for k in ("grad_y", "grad_h_n", "grad_c_n")}
    expected = torch.ops.lstm_fused.layer_backward(**dict(a, **zeros))
    got = torch.ops.lstm_fused.layer_backward(**dict(a, grad_y=None, grad_h_n=None, grad_c_n=None))
    for u, v in zip(got, expected):
        assert torch.equal(u, v)


def test_op_dims_beyond_int32_refused():
    """Dimensions >= 2^31 are refused before anything is allocated: stride-0
    (expanded) tensors stand in for the huge ones. Runs in a child process
    with 2 GiB of address space to spare, so a regression fails instead of
    swapping the machine."""
    code = textwrap.dedent("""
        import re, resource, torch, lstm_fused
        size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
        resource.setrlimit(resource.RLIMIT_AS, ((size << 10) + (2 << 30), resource.RLIM_INFINITY))
        big = 2 ** 31
        e = lambda *s: torch.zeros(1, dtype=torch.float32).expand(*s)
        cases = {
            "input": dict(x=e(2, big), h0=e(1, 1), c0=e(1, 1), w_ih=e(4, big), w_hh=e(4, 1)),
            "rows": dict(x=e(big, 1), h0=e(1, 1), c0=e(1, 1), w_ih=e(4, 1), w_hh=e(4, 1)),
            "rows-packed": dict(x=e(big, 1), h0=e(1, 1), c0=e(1, 1), w_ih=e(4, 1), w_hh=e(4, 1),
                                batch_sizes=torch.ones(1, dtype=torch.long).expand(big)),
            "hidden": dict(x=e(2, 1), h0=e(1, 1), c0=e(1, big // 4), w_ih=e(big, 1),
                           w_hh=e(big, 1), w_hr=e(1, big // 4)),
        }
        for name, a in cases.items():
            a = dict(dict(b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False), **a)
            try:
                torch.ops.lstm_fused.layer_forward(**a)
                print(name, "ran")
            except RuntimeError as exc:
                print(name, "refused:", str(exc).splitlines()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout + out.stderr[-2000:]
    for line in lines:
        assert "refused: lstm_fused: a dimension of" in line and "too large" in line, line
