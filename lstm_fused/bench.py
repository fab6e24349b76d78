"""Benchmark lstm_fused.LSTM against torch.nn.LSTM: ``python -m lstm_fused.bench``.

Every case runs our module and torch's with identical weights and inputs in the same
process: one untimed run each for the parity error, warm-up, then timed runs interleaved (the
order rotates each repeat): CUDA events on the GPU, ``time.perf_counter`` on the CPU.
References: ``torch`` is ``nn.LSTM`` as users run it (cuDNN on the GPU, oneDNN on the CPU); on
the GPU ``torch_nocudnn`` is the same module with cuDNN disabled (``--alt-ref`` adds
``torch_noonednn``, oneDNN disabled, on the CPU). Modes: ``inference`` is a forward in eval mode under no_grad; ``train`` is forward and
backward (input requires grad; the output's gradient is a fixed random tensor). ``decode``
cases time ``steps`` sequential T=1 calls carrying ``(h, c)``; ``decode-cell`` the same through
a stack of ``LSTMCell`` (``lstm_fused.LSTMCell`` against ``nn.LSTMCell``, when we have one);
``decode-graph`` (GPU, inference) the ``decode`` step captured once in a CUDA graph per module
and replayed ``steps`` times, the state carried in the graph's own buffers; their figures are
per step. TF32 is off unless ``--tf32``.

Compare two result files: ``python -m lstm_fused.bench compare OLD.json NEW.json``.

JSON schema (``schema`` = 1)::

    {
      "schema": 1,
      "environment": {
        "date": str (UTC, ISO 8601), "git_commit": str|null, "git_dirty": bool|null,
        "machine": str (slug used by --save-results), "device": "cpu"|"cuda",
        "device_name": str, "cpu_model": str, "cpu_isa": str (our CPU kernels' instruction
        set), "cpu_flags_isa": str|null (the processor's best), "onednn_max_cpu_isa":
        str|null (ONEDNN_MAX_CPU_ISA), "cpu_count": int, "threads": int,
        "python": str, "platform": str, "torch": str, "cuda": str|null, "cudnn": int|null,
        "lstm_fused": str, "ours_kernel": bool (our kernels ran; false: nn.LSTM fallback),
        "has_lstmcell": bool, "tf32": bool
      },
      "config": {"grid": str, "dtypes": [str], "modes": [str], "repeats": int,
                 "warmup": int, "refs": [str], "argv": [str]},
      "wall_s": float (the whole run),
      "cases": [{
        "id": str (unique per shape, e.g. "seq-T100-B32-I256-H256-L1"), "name": str,
        "kind": "seq"|"decode"|"decode-cell"|"decode-graph", "mode": "inference"|"train",
        "dtype": str,
        "shape": {"T": int, "B": int, "I": int, "H": int, "layers": int, "bidir": bool,
                  "lengths": [lo, hi]|null (packed variable lengths),
                  "frozen": bool (the input needs no gradient)},
        "unit": "ms per call"|"ms per step",
        "impls": {name: {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms": float,
                         "times_ms": [float] (every timed run, in order),
                         "peak_mem_bytes": int|null}},   # names: "ours", "torch", ...
        "speedup": float|null (impls.torch.median / impls.ours.median; null on error),
        "speedup_vs": {ref: float} (the same against every reference),
        "parity": {"output": float, "grad_input": float|null, "grad_weights": float|null},
        "engine": {"forward": str, "backward": str}|null (GPU: the CUDA kernels ours ran,
                  lstm_fused.cuda_plan: "persistent: ..." or "per-step"),
        "error": str|null (set when the case failed; then impls may be empty)
      }]
    }

Parity is max|ours - torch| / max|torch| over the whole output (and, in train mode, the input
gradient, and the largest such error among the parameters' gradients), in float64, against
``torch``'s result for the same input. Peak memory, taken on the last warm-up run of each
implementation: on the GPU ``torch.cuda.max_memory_allocated`` minus what was allocated before
the run; on the CPU the peak resident set (``VmHWM`` from /proc/self/status, reset through
/proc/self/clear_refs, after ``malloc_trim``) minus the resident set before the run:
approximate, null where /proc does not allow it.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused

SCHEMA = 1
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64,
          "double": torch.float64}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}
MODES = ("inference", "train")
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Case:
    """A shape: T steps (decode: sequential T=1 calls), batch B, input I, hidden H."""
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int = 1
    bidir: bool = False
    lengths: tuple = None  # (lo, hi): packed, lengths drawn uniformly in [lo, hi]
    frozen: bool = False  # the input needs no gradient (features, frozen embeddings)
    kind: str = "seq"  # "seq" | "decode" | "decode-cell" | "decode-graph"
    modes: tuple = MODES  # the modes this case runs in (of those asked for)

    @property
    def id(self):
        s = f"{self.kind}-T{self.T}-B{self.B}-I{self.I}-H{self.H}-L{self.layers}"
        s += "-bidir" if self.bidir else ""
        s += f"-packed{self.lengths[0]}-{self.lengths[1]}" if self.lengths else ""
        return s + ("-frozen" if self.frozen else "")

    @property
    def name(self):
        if self.kind != "seq":
            return f"{self.kind} L{self.layers} H{self.H} B{self.B} ({self.T} steps)"
        s = f"T{self.T} B{self.B} I{self.I} H{self.H}"
        s += f" L{self.layers}" if self.layers > 1 else ""
        s += " bidir" if self.bidir else ""
        s += f" packed {self.lengths[0]}-{self.lengths[1]}" if self.lengths else ""
        return s + (" frozen input" if self.frozen else "")


def _decode(B, H=512, steps=200, layers=2, modes=MODES, graph=False):
    kinds = ("decode", "decode-cell") + (("decode-graph",) if graph else ())
    return [Case(steps, B, H, H, layers, kind=k, modes=("inference",) if k == "decode-graph"
                 else modes) for k in kinds]


GRIDS = {
    # Issue 5's grid: fastrnns, FlashRNN-like, DeepBench-like, small and large batch, odd
    # sizes, 2-layer bidirectional, text classification, packed variable lengths; decode.
    "gpu": [Case(100, 64, 512, 512), Case(1024, 16, 768, 768),
            Case(25, 64, 512, 512), Case(25, 64, 1024, 1024), Case(25, 32, 2048, 2048),
            Case(100, 1, 256, 256), Case(100, 1, 1024, 1024), Case(512, 4, 512, 512),
            Case(200, 8, 128, 256), Case(100, 128, 1024, 1024), Case(100, 3, 300, 300),
            Case(100, 32, 512, 512, 2, True), Case(200, 64, 300, 256, 1, True),
            Case(100, 64, 512, 512, lengths=(10, 100))]
    + _decode(1, graph=True) + _decode(64, graph=True),
    # Issue 6's CPU grid, with issue 20's H = 1024 and the text classifier's 2-layer
    # bidirectional shape (also on frozen embeddings: an input that needs no gradient,
    # trained only). To finish in about 3 minutes on 2 cores: the packed case at the
    # size of the first (issue 5's (100, 64, 512, 512) packed: --case
    # 100,64,512,512,packed=10-100); decode 25 steps (--decode-steps 200) and inference only.
    "cpu": [Case(100, 32, 256, 256), Case(50, 64, 512, 512), Case(50, 32, 1024, 1024),
            Case(100, 32, 256, 256, 2, True),
            Case(100, 32, 256, 256, 2, True, frozen=True, modes=("train",)),
            Case(200, 8, 128, 128),
            Case(100, 1, 256, 256), Case(100, 32, 256, 256, lengths=(10, 100))]
    + _decode(1, steps=25, modes=("inference",)) + _decode(64, steps=25, modes=("inference",)),
    # Tiny shapes for tests: every kind of case in well under a second.
    "smoke": [Case(5, 3, 4, 6), Case(4, 2, 3, 5, 2, True), Case(6, 4, 5, 7, lengths=(2, 6)),
              Case(5, 2, 6, 6, 2, kind="decode"), Case(5, 2, 6, 6, 2, kind="decode-cell")],
}


# ---------------------------------------------------------------- environment

def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags_isa():
    """The best instruction set of the processor itself (whatever runs): avx512, avx2, other."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                if flags >= {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"}:
                    return "avx512"
                return "avx2" if flags >= {"avx2", "fma"} else "other"
    except OSError:
        pass
    return None


def _onednn_cap():
    """oneDNN's instruction-set cap from the environment (it reads it once, at its first
    use), e.g. "AVX2", or None."""
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(k):
            return os.environ[k]
    return None


def _git(*args):
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device, tf32):
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else _cpu_model()
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    threads = torch.get_num_threads()
    isa = lstm_fused.cpu_isa()  # the CPU kernels' instruction set: avx512, avx2, generic
    proc_isa, cap = _cpu_flags_isa(), _onednn_cap()
    # A processor run below its instruction set (our kernels forced lower, oneDNN capped)
    # is another kind of machine: e.g. cpu-amd-epyc-avx512-avx2cap-2t.
    kind = isa if proc_isa in (None, isa) and not cap else f"{proc_isa} {isa}cap"
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "lstm_fused::layer_forward", {"cpu": "CPU", "cuda": "CUDA"}[device.type])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": None if status is None else bool(status),
        "machine": _slug(name) if cuda else _slug(f"cpu {name} {kind} {threads}t"),
        "device": device.type, "device_name": name, "cpu_model": _cpu_model(), "cpu_isa": isa,
        "cpu_flags_isa": proc_isa, "onednn_max_cpu_isa": cap,
        "cpu_count": os.cpu_count(), "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lstm_fused": lstm_fused.__version__, "ours_kernel": bool(has_kernel),
        "has_lstmcell": hasattr(lstm_fused, "LSTMCell"), "tf32": tf32,
    }


# ---------------------------------------------------------------- memory

def _proc_status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(key)


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device):
    """Bytes the run of fn() needs above what was in use before it (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        _malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        base = _proc_status("VmRSS")
        fn()
        return max(0, _proc_status("VmHWM") - base)
    except OSError:
        return None


# ---------------------------------------------------------------- workloads

class Work:
    """One implementation of one case in one mode: ``run()`` does one timed unit."""

    def __init__(self, step, leaf, params, train, grad_out, ctx=contextlib.nullcontext):
        self.step, self.leaf, self.params = step, leaf, params
        self.train, self.grad_out, self.ctx = train, grad_out, ctx

    def prep(self):
        if self.train:
            self.leaf.grad = None  # None already where the input needs no gradient
            for p in self.params:
                p.grad = None

    def run(self):
        with self.ctx():
            if not self.train:
                with torch.no_grad():
                    return self.step()
            out = self.step()
            out.backward(self.grad_out)
            return out


def _seq_step(module, x):
    if isinstance(x, PackedSequence):
        return lambda: module(x)[0].data
    return lambda: module(x)[0]


def _decode_step(module, xs, h0, train):
    """xs.shape[0] calls of module, each on one step [1, B, I], carrying (h, c)."""
    views = xs.unbind(0)  # in train mode taken per run, as part of the graph

    def step():
        h, ys = h0, []
        for x in (xs.unbind(0) if train else views):
            y, h = module(x, h)
            ys.append(y)
        return torch.cat(ys)
    return step


def _graph_step(module, xs, h0):
    """The decode step of ``module`` captured once in a CUDA graph that reads the
    static input and state and writes the new state back into them; run() copies
    each step's input in and replays, xs.shape[0] times."""
    x_in = xs[0].clone()
    h_in, c_in = (t.clone() for t in h0)

    def body():
        y, (h, c) = module(x_in, (h_in, c_in))
        h_in.copy_(h)
        c_in.copy_(c)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y_out = body()
    views = xs.unbind(0)

    def step():
        h_in.copy_(h0[0])
        c_in.copy_(h0[1])
        for x in views:
            x_in.copy_(x)
            graph.replay()
        return y_out
    return step


def _cells_step(cells, xs, h0, train):
    """The same through a stack of cells, each step [B, I]."""
    views = xs.unbind(0)

    def step():
        hs, ys = list(h0), []
        for x in (xs.unbind(0) if train else views):
            for k, cell in enumerate(cells):
                hs[k] = cell(x, hs[k])
                x = hs[k][0]
            ys.append(x)
        return torch.stack(ys)
    return step


@contextlib.contextmanager
def _disabled(backend):
    """cuDNN or oneDNN ("mkldnn") off; torch.backends.*.flags would also reset their other
    flags (TF32 on)."""
    get, set_ = getattr(torch._C, f"_get_{backend}_enabled"), getattr(torch._C,
                                                                     f"_set_{backend}_enabled")
    was = get()
    set_(False)
    try:
        yield
    finally:
        set_(was)


def _cells_from(lstm, cls):
    """A stack of cls (LSTMCell) with the weights of lstm's layers."""
    cells = []
    for k in range(lstm.num_layers):
        cell = cls(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size,
                   device=lstm.weight_ih_l0.device, dtype=lstm.weight_ih_l0.dtype)
        cell.load_state_dict({n: getattr(lstm, f"{n}_l{k}") for n in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
        cells.append(cell)
    return cells


def build(case, mode, dtype, device, refs):
    """{impl name: Work} for a case; the same weights and inputs for all."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train = mode == "train"
    kw = dict(device=device, dtype=dtype)
    ref = nn.LSTM(case.I, case.H, case.layers, bidirectional=case.bidir, **kw)
    ours = lstm_fused.LSTM(case.I, case.H, case.layers, bidirectional=case.bidir, **kw)
    ours.load_state_dict(ref.state_dict())
    ref.train(train)
    ours.train(train)
    D = 2 if case.bidir else 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(**kw)

    if case.kind == "seq":
        x = randn(case.T, case.B, case.I).requires_grad_(train and not case.frozen)
        out_rows = case.T * case.B
        inp, leaf = x, x
        if case.lengths:
            lo, hi = case.lengths
            lengths = torch.randint(lo, hi + 1, (case.B,), generator=gen)
            lengths[0] = hi
            packed = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
            leaf = packed.data.detach().requires_grad_(train and not case.frozen)
            inp = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                                 packed.unsorted_indices)
            out_rows = int(lengths.sum())
        grad_out = randn(out_rows, D * case.H).view(
            (out_rows, -1) if case.lengths else (case.T, case.B, -1)) if train else None
        steps = {"ours": _seq_step(ours, inp), "torch": _seq_step(ref, inp)}
        modules = {"ours": ours, "torch": ref}
    else:
        cell = case.kind == "decode-cell"
        xs = randn(case.T, *(() if cell else (1,)), case.B, case.I).requires_grad_(train)
        leaf = xs
        grad_out = randn(case.T, case.B, case.H) if train else None
        if cell:
            if not hasattr(lstm_fused, "LSTMCell"):
                raise RuntimeError("lstm_fused.LSTMCell does not exist yet")
            h0 = [(randn(case.B, case.H), randn(case.B, case.H)) for _ in range(case.layers)]
            ref_cells = _cells_from(ref, nn.LSTMCell)
            our_cells = _cells_from(ref, lstm_fused.LSTMCell)
            steps = {"ours": _cells_step(our_cells, xs, h0, train),
                     "torch": _cells_step(ref_cells, xs, h0, train)}
            modules = {"ours": nn.ModuleList(our_cells), "torch": nn.ModuleList(ref_cells)}
            refs = []  # cuDNN and oneDNN's RNN have no part in LSTMCell
        else:
            h0 = (randn(case.layers, case.B, case.H), randn(case.layers, case.B, case.H))
            if case.kind == "decode-graph":
                if device.type != "cuda" or train:
                    raise RuntimeError("decode-graph cases need a GPU and inference mode")
                steps = {"ours": _graph_step(ours, xs, h0), "torch": _graph_step(ref, xs, h0)}
                refs = []  # each module has its own captured graph
            else:
                steps = {"ours": _decode_step(ours, xs, h0, train),
                         "torch": _decode_step(ref, xs, h0, train)}
            modules = {"ours": ours, "torch": ref}
    works = {name: Work(steps[name], leaf, list(modules[name].parameters()), train, grad_out)
             for name in ("ours", "torch")}
    flags = {"torch_nocudnn": lambda: _disabled("cudnn"),
             "torch_noonednn": lambda: _disabled("mkldnn")}
    for r in refs:
        works[r] = Work(steps["torch"], leaf, works["torch"].params, train, grad_out, flags[r])
    return works


# ---------------------------------------------------------------- measuring

def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if b.numel() else 0.0


def parity(works):
    """Max relative error of our output (and input gradient) against torch's."""
    res = {}
    for name in ("torch", "ours"):
        w = works[name]
        w.prep()
        out = w.run()
        grad = w.leaf.grad if w.train else None
        res[name] = (out.detach().clone(), grad.detach().clone() if grad is not None else None,
                     [p.grad.detach().clone() for p in w.params] if w.train else None)
        w.prep()
    (o, g, gw), (ro, rg, rgw) = res["ours"], res["torch"]
    return {"output": _rel_err(o, ro), "grad_input": _rel_err(g, rg) if g is not None else None,
            "grad_weights": max(_rel_err(a, b) for a, b in zip(gw, rgw)) if gw else None}


def _timed(work, device):
    work.prep()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        work.run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    work.run()
    return (time.perf_counter() - t0) * 1e3


def _quantile(sorted_xs, q):
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats(times, scale=1.0):
    times = [t * scale for t in times]
    s = sorted(times)
    return {"median_ms": _quantile(s, 0.5), "q1_ms": _quantile(s, 0.25),
            "q3_ms": _quantile(s, 0.75), "min_ms": s[0], "max_ms": s[-1], "times_ms": times}


def measure(works, device, repeats, warmup):
    """Interleaved timings: each repeat runs every implementation once, in rotating order.
    Returns ({impl: [ms]}, {impl: peak memory of its last warm-up run})."""
    names = list(works)
    mems = {}
    for i in range(max(warmup, 1)):
        for n in names:
            works[n].prep()
            if i == max(warmup, 1) - 1:
                mems[n] = peak_memory(works[n].run, device)
            else:
                works[n].run()
    times = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_timed(works[n], device))
    for w in works.values():
        w.prep()
    return times, mems


def engine(case, dtype, device):
    """The CUDA kernels lstm_fused runs for the case (lstm_fused.cuda_plan), or None."""
    if device.type != "cuda":
        return None
    m = lstm_fused.LSTM(case.I, case.H, case.layers, bidirectional=case.bidir, device=device,
                        dtype=dtype)
    steps = case.T if case.kind == "seq" else 1
    return lstm_fused.cuda_plan(m, torch.zeros(steps, case.B, case.I, device=device,
                                               dtype=dtype))


def _engine_short(e):
    """"persistent 128x8" / "per-step", forward/backward when they differ."""
    if e is None:
        return "—"

    def short(text):
        if not text.startswith("persistent"):
            return "per-step"
        directions, blocks, units = re.search(
            r"(?:(\d+) directions x )?(\d+) blocks x (\d+) units", text).groups()
        return f"persistent {directions + '×' if directions else ''}{blocks}×{units}"
    f, b = short(e["forward"]), short(e["backward"])
    return f if f == b else f"{f} / {b}"


def run_case(case, mode, dtype, device, refs, repeats, warmup):
    entry = {"id": case.id, "name": case.name, "kind": case.kind, "mode": mode,
             "dtype": SHORT[dtype],
             "shape": {"T": case.T, "B": case.B, "I": case.I, "H": case.H,
                       "layers": case.layers, "bidir": case.bidir,
                       "lengths": list(case.lengths) if case.lengths else None,
                       "frozen": case.frozen},
             "unit": "ms per call" if case.kind == "seq" else "ms per step",
             "impls": {}, "speedup": None, "speedup_vs": {},
             "parity": {"output": None, "grad_input": None, "grad_weights": None},
             "engine": None, "error": None}
    try:
        entry["engine"] = engine(case, dtype, device)
        works = build(case, mode, dtype, device, refs)
        entry["parity"] = parity(works)
        times, mems = measure(works, device, repeats, warmup)
        scale = 1.0 if case.kind == "seq" else 1.0 / case.T
        for n in works:
            entry["impls"][n] = stats(times[n], scale)
            entry["impls"][n]["peak_mem_bytes"] = mems[n]
        ours = entry["impls"]["ours"]["median_ms"]
        entry["speedup_vs"] = {n: entry["impls"][n]["median_ms"] / ours
                               for n in works if n != "ours"}
        entry["speedup"] = entry["speedup_vs"]["torch"]
    except Exception as e:  # noqa: BLE001  (one failing case must not end the run)
        entry["error"] = " ".join(f"{type(e).__name__}: {e}".split()).replace("|", "/")[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


# ---------------------------------------------------------------- output

def _ms(x):
    return "—" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _mb(x):
    return "—" if x is None else f"{x / 2**20:.1f}"


def _err(x):
    return "—" if x is None else f"{x:.1e}"


def _grad_err(parity):
    """The input gradient's error, or where the input needs none the
    parameters' ("dW ...")."""
    if parity.get("grad_input") is None and parity.get("grad_weights") is not None:
        return f"dW {parity['grad_weights']:.1e}"
    return _err(parity.get("grad_input"))


def table(result):
    """The markdown table of a result."""
    refs = [r for r in result["config"]["refs"] if r != "torch"]
    head = ["case", "mode", "dtype", "ours ms", "torch ms"] + [f"{r} ms" for r in refs]
    head += ["speed-up"] + [f"vs {r}" for r in refs] + ["parity out", "parity dx",
                                                        "mem ours/torch MB"]
    gpu = result.get("environment", {}).get("device") == "cuda"
    if gpu:
        head.append("engine")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cases"]:
        row = [c["name"], c["mode"], c["dtype"]]
        if c["error"]:
            row += [f"error: {c['error']}"] + [""] * (len(head) - 4)
        else:
            im = c["impls"]

            def t(n):
                if n not in im:
                    return "—"
                s = im[n]
                return f"{_ms(s['median_ms'])} ±{_ms((s['q3_ms'] - s['q1_ms']) / 2)}"
            row += [t("ours"), t("torch")] + [t(r) for r in refs]
            row += [f"{c['speedup']:.2f}×"] + [
                f"{c['speedup_vs'][r]:.2f}×" if r in c["speedup_vs"] else "—" for r in refs]
            row += [_err(c["parity"]["output"]), _grad_err(c["parity"]),
                    f"{_mb(im['ours']['peak_mem_bytes'])} / {_mb(im['torch']['peak_mem_bytes'])}"]
            if gpu:
                row.append(_engine_short(c.get("engine")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def summary(result):
    lines = []
    for mode in result["config"]["modes"]:
        for dt in result["config"]["dtypes"]:
            sp = [c["speedup"] for c in result["cases"]
                  if c["mode"] == mode and c["dtype"] == dt and c["speedup"]]
            if sp:
                lines.append(f"- {mode} {dt}: geometric-mean speed-up {_geomean(sp):.2f}× "
                             f"(min {min(sp):.2f}×, max {max(sp):.2f}×, {len(sp)} cases)")
    return "\n".join(lines)


def _cap_note(env):
    cap, proc = env.get("onednn_max_cpu_isa"), env.get("cpu_flags_isa")
    note = f" on a processor with {proc}" if proc and proc != env.get("cpu_isa") else ""
    return note + (f"; nn.LSTM's oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if cap else "")


def markdown(result):
    env = result["environment"]
    dev = env["device_name"] + ("" if env["device"] == "cpu" else
                                f", CUDA {env['cuda']}, cuDNN {env['cudnn']}")
    cfg = result["config"]
    return (f"# lstm_fused benchmark: {env['machine']}\n\n"
            f"{dev}; CPU {env['cpu_model']} ({env.get('cpu_isa', '?')} kernels{_cap_note(env)}), "
            f"{env['threads']} thread(s); torch {env['torch']}; "
            f"commit {(env['git_commit'] or 'unknown')[:10]}{' (dirty)' if env['git_dirty'] else ''}; "
            f"{env['date']}; TF32 {'on' if env['tf32'] else 'off'}.\n"
            f"Median ± half the interquartile range of {cfg['repeats']} interleaved runs after "
            f"{cfg['warmup']} warm-up; speed-up = torch / ours; decode cases per step; "
            f"parity = max relative error vs nn.LSTM (output, input gradient; dW: "
            f"the parameters' gradients where the input needs none).\n\n"
            f"{table(result)}\n\n{summary(result)}\n")


def plot(result, path):
    """A PNG of the speed-ups, one panel per mode, one bar per case and dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cfg = result["config"]
    modes = [m for m in cfg["modes"] if any(c["mode"] == m for c in result["cases"])]
    names = list(dict.fromkeys(c["name"] for c in result["cases"]))
    dts = cfg["dtypes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 1 + 0.4 * len(names)
                                                      * max(1, len(dts) / 2)),
                             sharey=True, squeeze=False)
    height = 0.8 / len(dts)
    for ax, mode in zip(axes[0], modes):
        for j, dt in enumerate(dts):
            sp = {c["name"]: c["speedup"] for c in result["cases"]
                  if c["mode"] == mode and c["dtype"] == dt}
            ys = [i + (j - (len(dts) - 1) / 2) * height for i in range(len(names))]
            vals = [sp.get(n) or 1.0 for n in names]
            # bars grow from 1.0: right = lstm_fused faster, left = slower
            ax.barh(ys, [v - 1.0 for v in vals], left=1.0, height=height, label=dt)
            for y, v, n in zip(ys, vals, names):
                if sp.get(n):
                    ax.text(v, y, f" {v:.2f}× " if v >= 1 else f" {v:.2f}× ", va="center",
                            ha="left" if v >= 1 else "right", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        lo = min([c["speedup"] for c in result["cases"] if c["speedup"]] + [1.0])
        hi = max([c["speedup"] for c in result["cases"] if c["speedup"]] + [1.0])
        ax.set_xlim(min(0.5, lo / 1.6), max(2.0, hi * 1.6))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{mode}: speed-up vs nn.LSTM (> 1: lstm_fused faster)", fontsize=10)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        if len(dts) > 1:
            ax.legend(fontsize=8)
    env = result["environment"]
    axes[0][0].invert_yaxis()  # shared: once
    fig.suptitle(f"lstm_fused vs torch.nn.LSTM — {env['device_name']}, torch {env['torch']}, "
                 f"{env['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def _progress(items, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class Plain:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def set_postfix_str(self, s):
                pass

            def write(self, s):
                if enabled:
                    print(s, file=sys.stderr, flush=True)

            def close(self):
                pass
        return Plain(items)
    bar = tqdm(items, file=sys.stderr, unit="case", dynamic_ncols=True)
    bar.write = lambda s: tqdm.write(s, file=sys.stderr)
    return bar


def _parse_case(spec):
    """T,B,I,H[,layers][,bidir][,packed=lo-hi][,frozen]"""
    parts = spec.split(",")
    nums = [int(p) for p in parts[:4]]
    layers, bidir, lengths, frozen = 1, False, None, False
    for p in parts[4:]:
        if p.isdigit():
            layers = int(p)
        elif p == "bidir":
            bidir = True
        elif p == "frozen":
            frozen = True
        elif p.startswith("packed="):
            lo, hi = p[7:].split("-")
            lengths = (int(lo), int(hi))
        else:
            raise argparse.ArgumentTypeError(f"bad case part {p!r} in {spec!r}")
    return Case(*nums, layers, bidir, lengths, frozen=frozen)


def parser():
    p = argparse.ArgumentParser(
        prog="python -m lstm_fused.bench",
        description="lstm_fused.LSTM vs torch.nn.LSTM: speed, memory and parity. "
                    "`python -m lstm_fused.bench compare OLD.json NEW.json` compares two runs.")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--grid", choices=sorted(GRIDS), help="shape preset (default: gpu on a "
                   "GPU, cpu otherwise)")
    p.add_argument("--case", action="append", type=_parse_case, default=[], metavar="SPEC",
                   help="extra or only shapes: T,B,I,H[,layers][,bidir][,packed=lo-hi][,frozen] "
                        "(replaces the grid unless --grid is given)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="T=1 calls per decode run (grid default: 200 gpu, 25 cpu)")
    p.add_argument("--filter", default=None, help="only cases whose name or id contains this")
    p.add_argument("--dtypes", default=None,
                   help="comma list (fp32,fp16,bf16,fp64); default fp32 on CPU, "
                        "fp32,fp16,bf16 on GPU")
    p.add_argument("--modes", default="inference,train", help="comma list of inference,train")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs before timing, after the parity run (the last one "
                        "measures memory)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--alt-ref", action=argparse.BooleanOptionalAction, default=None,
                   help="also time nn.LSTM without cuDNN (GPU, default on) / oneDNN (CPU, "
                        "default off)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 (pinned off by default)")
    p.add_argument("--out", default="bench/out", help="output folder (default bench/out)")
    p.add_argument("--json", default=None, help="JSON path (default OUT/bench-<machine>.json)")
    p.add_argument("--png", default=None, help="PNG path (default OUT/bench-<machine>.png)")
    p.add_argument("--md", default=None, help="markdown path (default OUT/bench-<machine>.md)")
    p.add_argument("--save-results", action="store_true",
                   help="write to bench/results/<machine>[-<variant>].{json,png,md} (committed "
                        "results; the variant names a non-default grid, dtypes or decode steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = parser().parse_args(argv)
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        return _bench(args, argv)
    finally:  # leave the process as it was (main is called in-process by tests)
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:3]
        torch.set_float32_matmul_precision(saved[3])


def defaults(gpu):
    """The grid and dtypes a run gets without --grid/--case and --dtypes."""
    return ("gpu", ["fp32", "fp16", "bf16"]) if gpu else ("cpu", ["fp32"])


def results_name(result, gpu, decode_steps=None):
    """The file name (no suffix) of a run in bench/results: the machine, then
    what differs from the default run, so that a float64 or custom run does
    not replace the grid's files: cpu-amd-epyc-avx512-2t-fp64, ...-custom,
    ...-decode200."""
    cfg = result["config"]
    grid, dtypes = defaults(gpu)
    parts = [result["environment"]["machine"]]
    if cfg["grid"] != grid:
        parts.append(cfg["grid"])
    if cfg["dtypes"] != dtypes:
        parts.append("-".join(cfg["dtypes"]))
    if decode_steps:
        parts.append(f"decode{decode_steps}")
    return "-".join(parts)


def _bench(args, argv):
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    default_grid, default_dtypes = defaults(gpu)
    names = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else default_dtypes
    if any(d not in DTYPES for d in names):
        parser().error(f"--dtypes: choose from {', '.join(DTYPES)}")
    dtypes = list(dict.fromkeys(DTYPES[d] for d in names))
    modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in MODES for m in modes):
        parser().error(f"--modes: choose from {', '.join(MODES)}")
    if args.repeats < 1:
        parser().error("--repeats must be at least 1")
    cases = (list(GRIDS[args.grid]) if args.grid else [] if args.case else
             list(GRIDS[default_grid])) + args.case
    if args.decode_steps:
        cases = [dataclasses.replace(c, T=args.decode_steps) if c.kind != "seq" else c
                 for c in cases]
    if args.filter:
        cases = [c for c in cases if args.filter in c.name or args.filter in c.id]
    if not hasattr(lstm_fused, "LSTMCell"):
        cases = [c for c in cases if c.kind != "decode-cell"]
    if not gpu:
        cases = [c for c in cases if c.kind != "decode-graph"]
    alt = args.alt_ref if args.alt_ref is not None else gpu
    refs = ["torch_nocudnn" if gpu else "torch_noonednn"] if alt else []

    env = environment(device, args.tf32)
    if not env["ours_kernel"]:
        print(f"warning: lstm_fused has no {device.type} kernels in this build: 'ours' is "
              "nn.LSTM's fallback", file=sys.stderr)
    result = {"schema": SCHEMA, "environment": env,
              "config": {"grid": args.grid or ("custom" if args.case else default_grid),
                         "dtypes": [SHORT[d] for d in dtypes], "modes": modes,
                         "repeats": args.repeats, "warmup": args.warmup,
                         "refs": ["torch"] + refs, "argv": argv},
              "wall_s": None, "cases": []}
    jobs = [(c, m, d) for c in cases for m in modes if m in c.modes for d in dtypes]
    bar = _progress(jobs, not args.no_progress)
    for case, mode, dtype in bar:
        bar.set_postfix_str(f"{case.name} {mode} {SHORT[dtype]}")
        c = run_case(case, mode, dtype, device, refs, args.repeats, args.warmup)
        result["cases"].append(c)
        if c["error"]:
            bar.write(f"{c['name']} {mode} {c['dtype']}: {c['error']}")
        else:
            im = c["impls"]
            bar.write(f"{c['name']} {mode} {c['dtype']}: ours {_ms(im['ours']['median_ms'])} "
                      f"ms, torch {_ms(im['torch']['median_ms'])} ms, {c['speedup']:.2f}×, "
                      f"parity {_err(c['parity']['output'])}"
                      + (f" / dx {_err(c['parity']['grad_input'])} / dW "
                         f"{_err(c['parity']['grad_weights'])}" if mode == "train" else ""))
    bar.close()
    result["wall_s"] = round(time.perf_counter() - t_start, 2)

    if args.save_results:
        root = REPO if (REPO / "pyproject.toml").exists() else Path.cwd()  # a checkout?
        base = root / "bench" / "results" / results_name(result, gpu, args.decode_steps)
        paths = {k: base.with_suffix("." + k) for k in ("json", "png", "md")}
    else:
        out = Path(args.out)
        paths = {k: out / f"bench-{env['machine']}.{k}" for k in ("json", "png", "md")}
    paths = {k: Path(getattr(args, k) or v) for k, v in paths.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["md"].write_text(markdown(result))
    try:
        plot(result, paths["png"])
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        paths.pop("png")
    print(markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {result['wall_s']:.0f} s",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- compare

class Malformed(ValueError):
    pass


def load(path):
    """A result file, checked enough for compare; raises Malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Malformed(f"{path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) \
            or not isinstance(data.get("environment"), dict):
        raise Malformed(f"{path}: not a lstm_fused bench result (no environment/cases)")
    for i, c in enumerate(data["cases"]):
        if not isinstance(c, dict) or not all(k in c for k in ("id", "mode", "dtype", "impls")):
            raise Malformed(f"{path}: case {i} lacks id/mode/dtype/impls")
        if not c.get("error"):
            try:
                for n in ("ours", "torch"):
                    float(c["impls"][n]["median_ms"])
            except (KeyError, TypeError, ValueError):
                raise Malformed(f"{path}: case {i} ({c['id']}) lacks ours/torch median_ms") \
                    from None
    return data


def compare(old, new):
    """Lines of a markdown table: per case in both, new/old time and speed-up change."""
    def key(c):
        return (c["id"], c["mode"], c["dtype"])
    before = {key(c): c for c in old["cases"] if not c.get("error")}
    head = ["case", "mode", "dtype", "ours old ms", "ours new ms", "new/old",
            "torch new/old", "speed-up old", "speed-up new", "change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = []
    for c in new["cases"]:
        o = before.get(key(c))
        if o is None or c.get("error"):
            continue
        om, nm = o["impls"]["ours"]["median_ms"], c["impls"]["ours"]["median_ms"]
        ot, nt = o["impls"]["torch"]["median_ms"], c["impls"]["torch"]["median_ms"]
        so, sn = ot / om, nt / nm
        ratios.append(nm / om)
        lines.append("| " + " | ".join([
            c.get("name", c["id"]), c["mode"], c["dtype"], _ms(om), _ms(nm), f"{nm / om:.2f}",
            f"{nt / ot:.2f}", f"{so:.2f}×", f"{sn:.2f}×", f"{(sn / so - 1) * 100:+.0f}%"]) + " |")
    return lines, ratios


def compare_main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m lstm_fused.bench compare",
        description="Per matching case (id, mode, dtype): our time new/old, torch's time "
                    "new/old (machine drift) and the speed-up change. Exit 2 on malformed input.")
    p.add_argument("old")
    p.add_argument("new")
    args = p.parse_args(argv)
    try:
        old, new = load(args.old), load(args.new)
    except Malformed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in ("device_name", "threads", "torch"):
        a, b = old["environment"].get(k), new["environment"].get(k)
        if a != b:
            print(f"note: {k} differs: {a} (old) vs {b} (new)")
    lines, ratios = compare(old, new)
    if not ratios:
        print("no case in common")
        return 0
    print("\n".join(lines))
    print(f"\n{len(ratios)} cases; geometric mean of our time new/old: {_geomean(ratios):.3f} "
          "(< 1: faster now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
