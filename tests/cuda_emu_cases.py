"""CUDA cases too large for tests/test_cuda.py's usual run, for the emulated
CUDA code (tests/test_cuda_emu.py runs them in a subprocess, with
LSTM_FUSED_TEST_DEVICE=emu and an emulated device of 132 multiprocessors);
on a GPU they run as they are: `python -m pytest tests/cuda_emu_cases.py`."""
import pytest
import torch

import lstm_fused
from test_cuda import DEVICE, half_case, rel_err  # noqa: F401  (loads the emulation)

H200 = dict(I=16, H=1024, T=3, B=2)


# (dtype, bidirectional): the plan expected on 132 multiprocessors. A
# bidirectional bfloat16 layer runs both directions in one launch (66
# multiprocessors each: 64 blocks of 16 units, W_hh slices of 128 KB); in
# float32 that slice (256 KB) does not fit, and each direction runs its own
# launch of 128 blocks.
PLANS = {
    (torch.float32, False): "persistent: 128 blocks x 8 units",
    (torch.bfloat16, False): "persistent: 128 blocks x 8 units",
    (torch.bfloat16, True): "persistent: 2 directions x 64 blocks x 16 units",
    (torch.float32, True): "persistent: 128 blocks x 8 units",
}


@pytest.mark.parametrize("dtype,bidirectional", sorted(PLANS, key=str), ids=str)
def test_h200_grid(dtype, bidirectional):
    """H = 1024: the grid of the plan all resident, forward and backward
    within nn.LSTM's error."""
    m = lstm_fused.LSTM(H200["I"], H200["H"], bidirectional=bidirectional).to(DEVICE, dtype)
    plan = lstm_fused.cuda_plan(m, torch.zeros(H200["T"], H200["B"], H200["I"], dtype=dtype,
                                               device=DEVICE))
    for phase in ("forward", "backward"):
        assert plan[phase].startswith(PLANS[dtype, bidirectional]), plan
    expected, theirs, ours = half_case(dict(bidirectional=bidirectional), dtype, **H200)
    floor = torch.finfo(dtype).eps / 2
    for e, t, o in zip(expected, theirs, ours):
        if e is not None:
            assert torch.isfinite(o).all()
            if dtype == torch.float32:  # the suite's float32 tolerance, against float64
                assert rel_err(o, e) <= 1e-5
            else:
                assert rel_err(o, e) <= 2 * rel_err(t, e) + floor
