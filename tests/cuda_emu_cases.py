"""CUDA cases too large for tests/test_cuda.py's usual run, for the emulated
CUDA code (tests/test_cuda_emu.py runs them in a subprocess, with
LSTM_FUSED_TEST_DEVICE=emu and an emulated device of 132 multiprocessors);
on a GPU they run as they are: `python -m pytest tests/cuda_emu_cases.py`."""
import pytest
import torch

import lstm_fused
from test_cuda import DEVICE, half_case, rel_err  # noqa: F401  (loads the emulation)

H200 = dict(I=16, H=1024, T=3, B=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_h200_grid(dtype):
    """H = 1024: one block of 8 units per multiprocessor (128 of 132), all
    resident, forward and backward within nn.LSTM's error."""
    m = lstm_fused.LSTM(H200["I"], H200["H"]).to(DEVICE, dtype)
    plan = lstm_fused.cuda_plan(m, torch.zeros(H200["T"], H200["B"], H200["I"], dtype=dtype,
                                               device=DEVICE))
    for phase in ("forward", "backward"):
        assert plan[phase].startswith("persistent: 128 blocks x 8 units"), plan
    expected, theirs, ours = half_case({}, dtype, **H200)
    floor = torch.finfo(dtype).eps / 2
    for e, t, o in zip(expected, theirs, ours):
        if e is not None:
            assert torch.isfinite(o).all()
            if dtype == torch.float32:  # the suite's float32 tolerance, against float64
                assert rel_err(o, e) <= 1e-5
            else:
                assert rel_err(o, e) <= 2 * rel_err(t, e) + floor
