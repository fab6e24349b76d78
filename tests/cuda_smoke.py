"""A small forward+backward on the GPU in every dtype, for the sanitizers:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/cuda_smoke.py
    compute-sanitizer --tool racecheck python tests/cuda_smoke.py

Sizes cross the kernels' tiles (32 units, 16 rows, 32-wide reduction);
packed, unsorted, bidirectional, two layers, with and without projection.
"""
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused


def main():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", "CUDA")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for proj in (0, 35):
            m = lstm_fused.LSTM(40, 33, num_layers=2, bidirectional=True, proj_size=proj)
            m = m.to("cuda", dtype)
            x = torch.randn(4, 17, 40, device="cuda", dtype=dtype, requires_grad=True)
            out, (h, c) = m(x)
            (out.float().sum() + h.float().sum() + c.float().sum()).backward()
            lengths = [4, 1, 3, 2] * 4 + [4]
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, (h, c) = m(packed)
            (out.data.float().sum() + h.float().sum() + c.float().sum()).backward()
            torch.cuda.synchronize()
            assert torch.isfinite(x.grad.float()).all()
            assert all(torch.isfinite(p.grad.float()).all() for p in m.parameters())
    print("cuda_smoke: ok")


if __name__ == "__main__":
    main()
