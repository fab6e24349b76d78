"""The CUDA code, run on the CPU under the emulation of CUDA (csrc/emu/).

tests/emu.py builds csrc/cuda (kernels and host code) as host C++ against the
emulator, cached by the content of csrc/: edit a kernel, rerun this file. The
CUDA parity suite (tests/test_cuda.py: every dtype, packed, reverse,
projection, tile edges, gradients) then runs in subprocesses whose ops are the
emulated CUDA ones: with the per-step kernels, with the persistent kernels,
with all blocks of every launch at once and the threads of a block scheduled
in reverse, and with a planted missing barrier (which must fail). The
emulator's own semantics (warp operations, atomics, wmma, grid.sync, launch
checks, deadlocks, poisoned shared memory) are checked on the kernels of
csrc/emu/selftest.cu. The tests marked `sanitized` (deselected by default;
`pytest -m sanitized tests/test_cuda_emu.py`, which CI runs) run the suite
under ThreadSanitizer and under ASan+UBSan: a race, an out-of-bounds access
or undefined behaviour fails them, and a planted missing barrier is a race.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emu

HERE = Path(__file__).resolve().parent
SUITE = str(HERE / "test_cuda.py")


@pytest.fixture(scope="module")
def lib():
    return emu.build()


def run_suite(lib, *args, sanitize=None, timeout=1800, **env):
    """pytest of the CUDA suite (or `args`) on the emulated library: (exit
    status, output, number passed)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           # Not captured by pytest under a sanitizer: its report ends the process.
           *(["-s"] if sanitize else []), *(args or [SUITE])]
    run = subprocess.run(cmd, cwd=HERE.parent, env=emu.environment(lib, sanitize, **env),
                         capture_output=True, text=True, timeout=timeout)
    out = run.stdout + run.stderr
    passed = re.search(r"(\d+) passed", out)
    return run.returncode, out, int(passed.group(1)) if passed else 0


def assert_suite_passes(lib, minimum, *args, **env):
    rc, out, passed = run_suite(lib, *args, **env)
    assert rc == 0, out[-6000:]
    assert passed >= minimum, out[-3000:]


# --- the CUDA suite on the emulated kernels -----------------------------------------

def test_cuda_suite_per_step_kernels(lib):
    assert_suite_passes(lib, 125, LSTM_FUSED_CUDA_ENGINE="step")


def test_cuda_suite_persistent_kernels(lib):
    """Every float32/float16/bfloat16 layer through the persistent kernels
    (an error where one cannot run them); float64 stays per step."""
    assert_suite_passes(lib, 125, LSTM_FUSED_CUDA_ENGINE="persistent")


def test_persistent_kernels_other_partitions(lib):
    """Two multiprocessors: up to 35 units per block, unit and projection
    slices that do not divide the sizes (the default 8 gives 8-9 units)."""
    assert_suite_passes(lib, 40, SUITE, "-k", "tile or packed or half",
                        LSTM_FUSED_CUDA_ENGINE="persistent", LSTM_FUSED_EMU_SMS=2)


def test_concurrent_blocks_reverse_schedule(lib):
    """Every launch with all blocks at once, a block's threads in reverse
    order, or shuffled: other interleavings than the default's."""
    assert_suite_passes(lib, 24, SUITE, "-k", "tile_boundaries", LSTM_FUSED_CUDA_ENGINE="step",
                        LSTM_FUSED_EMU_CONCURRENT=1, LSTM_FUSED_EMU_SCHEDULE="reverse")
    assert_suite_passes(lib, 12, SUITE, "-k", "tile_boundaries and float32",
                        LSTM_FUSED_CUDA_ENGINE="persistent", LSTM_FUSED_EMU_SCHEDULE="random:7")


def test_h200_sized_grid(lib):
    """H = 1024 on an emulated 132-multiprocessor device, as on an H200: 128
    blocks of 8 units (32768 CUDA threads at once), 150 KB of shared memory
    per block in float32; bidirectional bfloat16 in one launch of 2 x 64
    blocks of 16 units."""
    rc, out, passed = run_suite(lib, str(HERE / "cuda_emu_cases.py"), "-k", "h200",
                                LSTM_FUSED_CUDA_ENGINE="persistent", LSTM_FUSED_EMU_SMS=132)
    assert rc == 0 and passed == 4, out[-6000:]


def barrier(source, function, text, which=0):
    """`function:line` of the which-th line holding `text` in `function` of
    csrc/cuda/`source`: where LSTM_FUSED_EMU_DROP_SYNC plants a missing barrier."""
    lines = (HERE.parent / "csrc" / "cuda" / source).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f" {function}(" in line)
    found = [i + 1 for i, line in enumerate(lines[start:], start) if text in line]
    return f"{function}:{found[which]}"


PLANTED = {
    # The block barrier after a step kernel's shared tiles are loaded.
    "forward_step_kernel": ("lstm_cuda.cu", "step", "__syncthreads()"),
    "backward_step_kernel": ("lstm_cuda.cu", "step", "__syncthreads()"),
    # The persistent kernels' per-step grid barrier.
    "forward_kernel": ("persistent.cu", "persistent", "grid.sync()"),
    "backward_kernel": ("persistent.cu", "persistent", "grid.sync()"),
}


@pytest.mark.parametrize("function", sorted(PLANTED))
def test_planted_missing_barrier_fails_the_suite(lib, function):
    """Deleting a barrier (the emulator skips it) makes the parity tests fail:
    threads read what other threads have not written yet."""
    source, engine, text = PLANTED[function]
    rc, out, _ = run_suite(lib, SUITE, "-k", "tile_boundaries and float32 and 37",
                           LSTM_FUSED_CUDA_ENGINE=engine,
                           LSTM_FUSED_EMU_DROP_SYNC=barrier(source, function, text))
    assert rc == 1 and re.search(r"\b[1-9] failed", out), out[-3000:]


# --- the same under the sanitizers (minutes: a build each; deselected unless -m sanitized,
# which CI runs) ----------------------------------------------------------------------------

SANITIZED = "tile or packed or half"


@pytest.mark.sanitized
@pytest.mark.parametrize("sanitize", ["thread", "address"])
def test_cuda_suite_sanitized(sanitize):
    """ThreadSanitizer (a race between the emulated threads: a missing or
    misplaced barrier) or ASan + UBSan (out-of-bounds, use after free,
    undefined behaviour) over the host code and kernels, both engines."""
    lib = emu.build(sanitize)
    persistent = SANITIZED if sanitize == "address" else "tile_boundaries and float32"
    for engine, cases in (("step", SANITIZED), ("persistent", persistent)):
        rc, out, passed = run_suite(lib, SUITE, "-k", cases, sanitize=sanitize,
                                    LSTM_FUSED_CUDA_ENGINE=engine)
        assert rc == 0 and passed > 0, f"{engine}:\n{out[-8000:]}"


@pytest.mark.sanitized
@pytest.mark.parametrize("function", ["forward_step_kernel", "forward_kernel"])
def test_planted_missing_barrier_is_a_race(function):
    """Under ThreadSanitizer a deleted barrier is reported as a data race."""
    source, engine, text = PLANTED[function]
    lib = emu.build("thread")
    rc, out, _ = run_suite(lib, SUITE, "-x", "-k", "tile_boundaries and float32 and 37",
                           sanitize="thread", LSTM_FUSED_CUDA_ENGINE=engine,
                           LSTM_FUSED_EMU_DROP_SYNC=barrier(source, function, text))
    assert rc != 0 and "ThreadSanitizer: data race" in out, out[-3000:]


# --- the emulator itself -------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest():
    torch.ops.load_library(str(emu.build(selftest=True)))
    return torch.ops.lstm_fused_emu_selftest


def test_warp_operations(selftest):
    out = selftest.warp_ops()
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    v = t * 10
    expected = [
        v[base + (lane + 3) % 32],                                  # __shfl_sync
        v[base + (lane ^ 5)],                                       # __shfl_xor_sync
        torch.where(lane + 4 < 32, v[(t + 4) % 64], v),             # __shfl_down_sync
        torch.where(lane >= 4, v[(t - 4) % 64], v),                 # __shfl_up_sync
        v[base + (lane // 8) * 8 + lane // 8],                      # width 8
    ]
    for k, e in enumerate(expected):
        assert torch.equal(out[k], e.int()), k
    ballot = [sum(1 << (i % 32) for i in range(w * 32, w * 32 + 32) if i % 3 == 0) for w in (0, 1)]
    assert [int(x) & 0xffffffff for x in out[5]] == [ballot[0]] * 32 + [ballot[1]] * 32
    assert out[6].eq(1).all()                                       # __all_sync
    assert out[7].tolist() == [0] * 32 + [1] * 32                   # __any_sync
    assert out[8].tolist() == [496] * 32 + [1520] * 32              # butterfly sum


def test_atomics(selftest):
    assert selftest.atomics(5).flatten().tolist() == [1280.0, 640.0, 1279.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wmma(selftest, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 16, generator=g).to(dtype)
    b_cols = torch.randn(2, 16, 16, generator=g).to(dtype)  # [col][k]
    c = torch.randn(2, 16, 16, generator=g)
    d = selftest.mma(a, b_cols, c)
    expected = 2 * (a.double() @ b_cols.double().transpose(1, 2) + c.double())
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


def test_grid_sync(selftest):
    seen = selftest.grid_sync(6, 4, True)
    r, b = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    assert torch.equal(seen, (r * 1000 + (b + 1) % 6).int())
    with pytest.raises(RuntimeError, match="not launched cooperatively"):
        selftest.grid_sync(2, 1, False)


def test_shared_memory_is_poisoned_and_a_race_shows(selftest):
    assert torch.equal(selftest.neighbours(True), ((torch.arange(128) + 1) % 128).float())
    racy = selftest.neighbours(False)   # threads run ahead of their neighbours' writes
    assert racy.isnan().sum() >= 64
    assert selftest.unwritten_shared(100, 0).isnan().all()


def test_launch_checks(selftest):
    with pytest.raises(RuntimeError, match="block of 65 threads for a kernel bounded at 64"):
        selftest.over_bound()
    with pytest.raises(RuntimeError, match="outside the limits"):
        selftest.configure(0, 1, 0, False)
    with pytest.raises(RuntimeError, match="grid .* outside the limits"):
        selftest.configure(32, 0, 0, False)
    with pytest.raises(RuntimeError, match="above the kernel's limit of 49152"):
        selftest.unwritten_shared(20000, 0)
    assert selftest.unwritten_shared(20000, 100000).isnan().all()  # after raising the limit
    with pytest.raises(RuntimeError, match="above the device's"):
        selftest.unwritten_shared(10, 300000)
    resident = selftest.resident_blocks(64, 0)
    assert resident == 32 * 8  # 32 blocks per SM, 8 emulated SMs
    selftest.configure(64, resident, 0, True)
    with pytest.raises(RuntimeError, match="cooperative launch of .* blocks, only"):
        selftest.configure(64, resident + 1, 0, True)
    assert selftest.resident_blocks(1024, 100 << 10) == 2 * 8  # by shared memory


def test_deadlock_is_an_error(selftest):
    with pytest.raises(RuntimeError, match="deadlock .* 33 at __syncthreads, 31 at a warp barrier"):
        selftest.deadlock()
