"""DistributedDataParallel: two CPU processes (gloo) train lstm_fused.LSTM and,
separately, nn.LSTM from the same start on the same data; the weights match."""
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lstm_fused

WORLD = 2
STEPS = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    def __init__(self, lstm_cls):
        super().__init__()
        self.lstm = lstm_cls(4, 6, num_layers=2, bidirectional=True, batch_first=True,
                             dtype=torch.float64)
        self.head = nn.Linear(12, 2, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out.mean(1))


def train(rank, port, out_dir):
    """One rank: trains Net(lstm_fused.LSTM), then Net(nn.LSTM); rank 0 saves."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, lstm_cls in (("ours", lstm_fused.LSTM), ("ref", nn.LSTM)):
            torch.manual_seed(0)  # same start on every rank
            model = nn.parallel.DistributedDataParallel(Net(lstm_cls))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            for _ in range(STEPS):
                x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
                y = torch.randn(3, 2, generator=g, dtype=torch.float64)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            if rank == 0:
                torch.save(model.module.state_dict(), os.path.join(out_dir, name + ".pt"))
    finally:
        dist.destroy_process_group()
    # Done: leave at once. The interpreter's own exit can abort in gloo's
    # teardown ("terminate called without an active exception", seen once in
    # a full run), after everything here has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ddp(out_dir):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=train, args=(r, port, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return torch.load(out_dir / "ours.pt"), torch.load(out_dir / "ref.pt")


@pytest.mark.slow
def test_ddp_matches_nn_lstm(tmp_path):
    ours, ref = run_ddp(tmp_path)
    torch.manual_seed(0)
    start = Net(nn.LSTM).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert not torch.equal(ref[k], start[k]), f"{k} did not train"
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-9, atol=1e-10, msg=k)
