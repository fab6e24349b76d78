"""Autocast: float32 input runs in the autocast dtype and comes out in it, as
in nn.LSTM (torch 2.13: the oneDNN path on the CPU, cuDNN on CUDA); the
parameters keep float32 gradients."""
import pytest
import torch

import lstm_fused
from helpers import pair

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)]
IDS = ["plain", "deep"]


def forward_backward(module, x, device, dtype):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    with torch.autocast(device, dtype):
        try:
            out, (h, c) = module(x)
        except RuntimeError as e:
            # nn.LSTM on a CPU whose oneDNN has no bf16 LSTM for float32 input (AVX2-only
            # machines: "could not create a primitive descriptor"): the same cast done by
            # hand, which takes oneDNN's bf16-input path.
            if isinstance(module, lstm_fused.LSTM) or "primitive descriptor" not in str(e):
                raise
            out, (h, c) = module(x.to(dtype))
    (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    return out, h, c, x.grad, [p.grad for p in module.parameters()]


def check(ref, ours, x, device, dtype, check_values=True):
    r_out, r_h, r_c, r_dx, r_dw = forward_backward(ref, x, device, dtype)
    out, h, c, dx, dw = forward_backward(ours, x, device, dtype)
    assert (out.dtype, h.dtype, c.dtype) == (r_out.dtype, r_h.dtype, r_c.dtype) == (dtype,) * 3
    assert dx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in dw)
    if check_values:  # both round to 8 (bf16) or 11 (fp16) bits, at different places
        tol = dict(rtol=0.05, atol=0.03)
        for a, b in zip((out, h, c, dx, *dw), (r_out, r_h, r_c, r_dx, *r_dw)):
            torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpu_bfloat16(cfg):
    ref, ours = pair(4, 5, torch.float32, **cfg)
    x = torch.randn(3, 6, 4)
    check(ref, ours, x, "cpu", torch.bfloat16)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpu_float16(cfg):
    """nn.LSTM fails here (oneDNN has no float16 LSTM: 'could not create a
    primitive descriptor'); ours runs in float16 like the bfloat16 case."""
    ref, ours = pair(4, 5, torch.float32, **cfg)
    x = torch.randn(3, 6, 4)
    out, h, c, dx, dw = forward_backward(ours, x, "cpu", torch.float16)
    assert out.dtype == h.dtype == c.dtype == torch.float16
    expected, (eh, ec) = ref(x)
    torch.testing.assert_close(out.float(), expected, rtol=0.01, atol=0.005)
    torch.testing.assert_close(c.float(), ec, rtol=0.01, atol=0.005)


def test_outside_autocast_and_float64_unchanged():
    ref, ours = pair(4, 5, torch.float64)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    with torch.autocast("cpu", torch.bfloat16):
        out, (h, c) = ours(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64  # autocast leaves float64 alone
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-10, atol=1e-10)
    _, ours32 = pair(4, 5, torch.float32)
    with torch.autocast("cpu", torch.bfloat16, enabled=False):
        assert ours32(x.float())[0].dtype == torch.float32


def test_compiled_autocast():
    ref, ours = pair(4, 5, torch.float32, num_layers=2)
    x = torch.randn(6, 2, 4)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", torch.bfloat16):
        out, (h, c) = compiled(x)
        expected, _ = ours(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS + [dict(proj_size=3)], ids=IDS + ["proj"])
def test_cuda(cfg, dtype):
    ref, ours = pair(4, 5, torch.float32, **cfg)
    ref, ours = ref.cuda(), ours.cuda()
    x = torch.randn(3, 6, 4, device="cuda")
    check(ref, ours, x, "cuda", dtype)
