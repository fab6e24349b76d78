"""lstm_fused.LSTMCell against torch.nn.LSTMCell: outputs, every gradient,
errors, state_dicts; and a T=1 loop of lstm_fused.LSTM against one call."""
import pytest
import torch
from torch import nn

import lstm_fused
from helpers import assert_close, pair

DTYPES = [torch.float64, torch.float32]


def cell_pair(input_size, hidden_size, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.LSTMCell(input_size, hidden_size, dtype=dtype, **kw)
    ours = lstm_fused.LSTMCell(input_size, hidden_size, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_cell(module, x, hx, steps=1):
    """`steps` calls carrying the state, then backward of a loss touching h and
    c; returns h, c and the gradients of x, h0, c0 and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_(True) for h in hx)
    module.zero_grad()
    state = hx
    for _ in range(steps):
        state = module(x, state)
    h, c = state
    g = torch.Generator().manual_seed(7)
    loss = ((h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
            + (c * torch.randn(c.shape, generator=g, dtype=c.dtype)).sum())
    loss.backward()
    grads = [x.grad] + ([t.grad for t in hx] if hx is not None else [])
    return [h, c] + grads + [p.grad for p in module.parameters()]


def compare(a, b, dtype):
    assert len(a) == len(b)
    for k, (u, v) in enumerate(zip(b, a)):
        assert u is not None and v is not None, f"result {k}: missing gradient"
        assert u.shape == v.shape, f"result {k}: {u.shape} vs {v.shape}"
        assert_close(u, v, dtype, what=f"result {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("steps", [1, 3])
def test_parity(dtype, batched, with_hx, bias, steps):
    ref, ours = cell_pair(5, 7, dtype, bias=bias)
    lead = (4,) if batched else ()
    x = torch.randn(*lead, 5, dtype=dtype)
    hx = (torch.randn(*lead, 7, dtype=dtype), torch.randn(*lead, 7, dtype=dtype)) if with_hx else None
    a, b = run_cell(ref, x, hx, steps), run_cell(ours, x, hx, steps)
    assert b[0].shape == ((4, 7) if batched else (7,))
    compare(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_cpu(dtype):
    """Half input runs in float32: the result is the float32 cell cast back."""
    ref, ours = cell_pair(5, 7, torch.float32)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    ours.to(dtype)
    ref.to(dtype).float()  # the same rounded weights, in float32
    want = ref(x.to(dtype).float(), (h.to(dtype).float(), c.to(dtype).float()))
    got = ours(x.to(dtype), (h.to(dtype), c.to(dtype)))
    for u, v in zip(got, want):
        assert u.dtype == dtype
        torch.testing.assert_close(u, v.to(dtype))


def test_gradcheck():
    _, ours = cell_pair(3, 4, torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return torch.func.functional_call(
            ours, {"weight_ih": w_ih, "weight_hh": w_hh, "bias_ih": b_ih, "bias_hh": b_hh},
            (x, (h, c)))

    inputs = (x, h, c) + tuple(p.detach().clone().requires_grad_(True) for p in ours.parameters())
    assert torch.autograd.gradcheck(f, inputs)


def _error(module, *args):
    try:
        module(*args)
    except Exception as e:  # noqa: BLE001  (any type: it is compared)
        return type(e), str(e)
    return None


def _bad_calls():
    r = torch.randn
    return {
        "input-size": (r(3, 4),),
        "3d-input": (r(2, 3, 5),),
        "0d-input": (r(()),),
        "hx-batch": (r(3, 5), (r(2, 6), r(2, 6))),
        "h-size": (r(3, 5), (r(3, 7), r(3, 6))),
        "c-size": (r(3, 5), (r(3, 6), r(3, 7))),
        "c-batch": (r(3, 5), (r(3, 6), r(2, 6))),
        "batched-input-unbatched-hx": (r(3, 5), (r(6), r(6))),
        "unbatched-input-batched-hx": (r(5), (r(3, 6), r(3, 6))),
        "3d-hx": (r(3, 5), (r(1, 3, 6), r(3, 6))),
        "one-state": (r(3, 5), (r(3, 6),)),
        "input-dtype": (r(3, 5, dtype=torch.float64),),
        "hx-dtype": (r(3, 5), (r(3, 6, dtype=torch.float64), r(3, 6))),
        "unbatched-input-size": (r(4), (r(6), r(6))),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_errors_match(case):
    ref, ours = cell_pair(5, 6, torch.float32)
    args = _bad_calls()[case]
    want = _error(ref, *args)
    assert want is not None, "nn.LSTMCell accepts this call; the case is wrong"
    assert _error(ours, *args) == want


def test_empty_batch_like_torch():
    ref, ours = cell_pair(5, 6, torch.float32)
    x = torch.randn(0, 5)
    for u, v in zip(ours(x), ref(x)):
        assert u.shape == v.shape == (0, 6)


def test_module_api():
    ref, ours = cell_pair(5, 6, torch.float32, bias=False)
    assert isinstance(ours, nn.LSTMCell)
    assert repr(ours) == "LSTMCell(5, 6, bias=False)"
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    torch.manual_seed(3)
    ref = nn.LSTMCell(4, 5, bias=bias, dtype=torch.float64)
    ours = lstm_fused.LSTMCell(4, 5, bias=bias, dtype=torch.float64)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 4, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())  # torch -> ours
    for u, v in zip(ours(x), ref(x)):
        assert_close(u, v, torch.float64)
    for p in ours.parameters():  # ours (changed) -> torch
        p.data.add_(0.1)
    ref.load_state_dict(ours.state_dict())
    for u, v in zip(ours(x), ref(x)):
        assert_close(u, v, torch.float64)


def test_cell_equals_lstm_step():
    """Our cell equals a 1-layer lstm_fused.LSTM with the same weights."""
    _, cell = cell_pair(3, 4, torch.float64)
    _, lstm = pair(3, 4, torch.float64)
    lstm.load_state_dict({k.replace("ih", "ih_l0").replace("hh", "hh_l0"): v
                          for k, v in cell.state_dict().items()})
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    _, (h_n, c_n) = lstm(x[None], (h[None], c[None]))
    h1, c1 = cell(x, (h, c))
    assert_close(h1, h_n[0], torch.float64)
    assert_close(c1, c_n[0], torch.float64)


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_step_loop_equals_sequence(batch_first):
    """T=1 calls of a 2-layer lstm_fused.LSTM carrying (h, c) give the output,
    state and every gradient of one call over the whole sequence."""
    dt = torch.float64
    _, lstm = pair(3, 5, dt, num_layers=2, batch_first=batch_first)
    T, B = 6, 3
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=dt)
    h0, c0 = torch.randn(2, B, 5, dtype=dt), torch.randn(2, B, 5, dtype=dt)
    tdim = 1 if batch_first else 0
    g = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=dt)

    def go(loop):
        xs, h, c = (t.clone().requires_grad_(True) for t in (x, h0, c0))
        lstm.zero_grad()
        if loop:
            outs, state = [], (h, c)
            for t in range(T):
                y, state = lstm(xs.narrow(tdim, t, 1), state)
                outs.append(y)
            out, (h_n, c_n) = torch.cat(outs, tdim), state
        else:
            out, (h_n, c_n) = lstm(xs, (h, c))
        ((out * g).sum() + (h_n * 2).sum() + (c_n * 3).sum()).backward()
        return [out, h_n, c_n, xs.grad, h.grad, c.grad] + [p.grad for p in lstm.parameters()]

    for k, (u, v) in enumerate(zip(go(True), go(False))):
        assert_close(u, v, dt, what=f"result {k}")
