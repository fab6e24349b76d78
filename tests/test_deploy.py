"""Deployment as with torch.nn.LSTM: ONNX export with both exporters, run in
onnxruntime at other shapes than the export's; torch.jit.trace and script,
saved and loaded; quantize_dynamic (and static quantization). Each compared
with nn.LSTM on the same weights."""
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq

import lstm_fused
from helpers import readme_code

CFGS = [dict(), dict(num_layers=2), dict(bidirectional=True),
        dict(num_layers=2, bidirectional=True, batch_first=True), dict(bias=False)]
PROJ = [dict(proj_size=3), dict(proj_size=2, num_layers=2, bidirectional=True, batch_first=True)]
cfg_id = lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"  # noqa: E731
TOL = dict(rtol=0, atol=1e-5)


class Net(nn.Module):
    """An LSTM and a linear head: (head(output), h_n, c_n)."""

    def __init__(self, cls, **cfg):
        super().__init__()
        self.lstm = cls(4, 5, **cfg)
        out = cfg.get("proj_size") or 5
        self.head = nn.Linear(out * (2 if cfg.get("bidirectional") else 1), 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return self.head(y), h, c


def nets(cfg, seed=0):
    """(Net on nn.LSTM, Net on lstm_fused.LSTM), same weights, eval."""
    torch.manual_seed(seed)
    ref = Net(nn.LSTM, **cfg).eval()
    ours = Net(lstm_fused.LSTM, **cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def sequence(cfg, steps, batch, seed=1):
    g = torch.Generator().manual_seed(seed + 10 * steps + batch)
    shape = (batch, steps, 4) if cfg.get("batch_first") else (steps, batch, 4)
    return torch.randn(shape, generator=g)


# Export at one (steps, batch), run at others.
EXPORT_SHAPE, RUN_SHAPES = (5, 3), [(7, 2), (1, 4), (12, 1)]


def onnx_ops(path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    return [n.op_type for n in model.graph.node], domains


def max_error_in_onnxruntime(path, ref, cfg):
    """Largest difference between onnxruntime's outputs and nn.LSTM's (eager)
    over RUN_SHAPES."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for steps, batch in RUN_SHAPES:
        x = sequence(cfg, steps, batch)
        got = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = ref(x)
        assert len(got) == 3
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            worst = max(worst, (torch.from_numpy(g) - e).abs().max().item())
    return worst


def export_torchscript(model, cfg, path):
    axes = {0: "batch", 1: "steps"} if cfg.get("batch_first") else {0: "steps", 1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model, (sequence(cfg, *EXPORT_SHAPE),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y", "h", "c"],
                          dynamic_axes={"x": axes, "y": axes, "h": {1: "batch"},
                                        "c": {1: "batch"}})


def export_dynamo(model, cfg, path):
    steps, batch = torch.export.Dim("steps"), torch.export.Dim("batch")
    dims = {0: batch, 1: steps} if cfg.get("batch_first") else {0: steps, 1: batch}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sequence(cfg, *EXPORT_SHAPE),), str(path), dynamo=True,
                          dynamic_shapes={"x": dims}, verbose=False)


@pytest.mark.parametrize("cfg", CFGS, ids=cfg_id)
def test_onnx_torchscript_exporter(cfg, tmp_path):
    """dynamo=False: the graph is nn.LSTM's (the ONNX LSTM op), dynamic in
    batch and steps."""
    pytest.importorskip("onnxruntime")
    ref, ours = nets(cfg)
    export_torchscript(ours, cfg, tmp_path / "ours.onnx")
    export_torchscript(ref, cfg, tmp_path / "torch.onnx")
    ops, domains = onnx_ops(tmp_path / "ours.onnx")
    assert "LSTM" in ops and domains <= {"", "ai.onnx"}, (ops, domains)
    assert ops == onnx_ops(tmp_path / "torch.onnx")[0]
    assert max_error_in_onnxruntime(tmp_path / "ours.onnx", ref, cfg) <= TOL["atol"]


@pytest.mark.parametrize("cfg", CFGS[:2] + CFGS[3:4] + PROJ[1:], ids=cfg_id)
def test_onnx_dynamo_exporter(cfg, tmp_path):
    """dynamo=True: standard ops only (the ONNX LSTM op; a Scan with a
    projection, which that op lacks), dynamic in batch and steps. (nn.LSTM's
    own export fixes the steps at the export's, torch 2.13.)"""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ref, ours = nets(cfg)
    export_dynamo(ours, cfg, tmp_path / "ours.onnx")
    ops, domains = onnx_ops(tmp_path / "ours.onnx")
    assert ("Scan" if cfg.get("proj_size") else "LSTM") in ops, ops
    assert domains <= {"", "ai.onnx"}, domains
    assert max_error_in_onnxruntime(tmp_path / "ours.onnx", ref, cfg) <= TOL["atol"]


def test_onnx_projection_torchscript_exporter_fails_as_nn_lstm(tmp_path):
    """The TorchScript exporter has no ONNX form of a projection: nn.LSTM's
    error, word for word."""
    cfg = PROJ[0]
    errors = []
    for model in nets(cfg):
        with pytest.raises(Exception) as info:
            export_torchscript(model, cfg, tmp_path / "m.onnx")
        errors.append((type(info.value), str(info.value).splitlines()[0]))
    assert errors[0] == errors[1]
    assert "LSTMs with projections" in errors[0][1]


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_cell(dynamo, tmp_path):
    """LSTMCell exports as nn.LSTMCell does; onnxruntime at another batch."""
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 5).eval()
    ours = lstm_fused.LSTMCell(4, 5).eval()
    ours.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5)
    path = str(tmp_path / "cell.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(ours, (x, (h, c)), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: batch}, ({0: batch}, {0: batch})))
        else:
            torch.onnx.export(ours, (x, (h, c)), path, dynamo=False,
                              input_names=["x", "h", "c"], output_names=["h1", "c1"],
                              dynamic_axes={k: {0: "batch"} for k in ("x", "h", "c", "h1", "c1")})
    _, domains = onnx_ops(path)
    assert domains <= {"", "ai.onnx"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, h, c = torch.randn(5, 4), torch.randn(5, 5), torch.randn(5, 5)
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()],
                                     (x.numpy(), h.numpy(), c.numpy()))))
    with torch.no_grad():
        for g, e in zip(got, ref(x, (h, c))):
            torch.testing.assert_close(torch.from_numpy(g), e, **TOL)


def saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("cfg", CFGS[3:4] + PROJ[:1], ids=cfg_id)
def test_jit_trace(cfg):
    """torch.jit.trace with its check (check_trace) on; saved, loaded and run
    at other shapes, as nn.LSTM's traced module."""
    ref, ours = nets(cfg)
    x = sequence(cfg, *EXPORT_SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's (the same for nn.LSTM)
        traced_ref = torch.jit.trace(ref, x)
        traced = saved_and_loaded(torch.jit.trace(ours, x))
    for steps, batch in RUN_SHAPES:
        x = sequence(cfg, steps, batch)
        for a, b in zip(traced(x), traced_ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jit_trace_cell():
    torch.manual_seed(0)
    ref, ours = nn.LSTMCell(4, 5), lstm_fused.LSTMCell(4, 5)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 5))
    traced = saved_and_loaded(torch.jit.trace(ours, (x, hx)))
    traced_ref = torch.jit.trace(ref, (x, hx))
    x, hx = torch.randn(6, 4), (torch.randn(6, 5), torch.randn(6, 5))
    for a, b in zip(traced(x, hx), traced_ref(x, hx)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", CFGS[3:4] + PROJ[:1], ids=cfg_id)
def test_jit_script(cfg):
    """torch.jit.script compiles nn.LSTM's forward (ours is Python) over the
    same weights: what scripting nn.LSTM gives."""
    ref, ours = nets(cfg)
    scripted_ref = torch.jit.script(ref)
    scripted = saved_and_loaded(torch.jit.script(ours))
    for steps, batch in RUN_SHAPES:
        x = sequence(cfg, steps, batch)
        for a, b in zip(scripted(x), scripted_ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The eager model still computes the same.
    for a, b in zip(ours(x), ref(x)):
        torch.testing.assert_close(a, b, **TOL)


def test_jit_script_cell():
    torch.manual_seed(0)
    ref, ours = nn.LSTMCell(4, 5), lstm_fused.LSTMCell(4, 5)
    ours.load_state_dict(ref.state_dict())
    scripted = saved_and_loaded(torch.jit.script(ours))
    x = torch.randn(6, 4)
    for a, b in zip(scripted(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Seq(nn.Module):
    """Linear -> LSTM -> LSTMCell on the last output."""

    def __init__(self, lstm, cell):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.lstm = lstm(4, 6, num_layers=2, bidirectional=True)
        self.cell = cell(12, 5)

    def forward(self, x):
        y, _ = self.lstm(self.inp(x))
        return y, self.cell(y[-1])[0]


def seqs():
    torch.manual_seed(0)
    ref = Seq(nn.LSTM, nn.LSTMCell)
    ours = Seq(lstm_fused.LSTM, lstm_fused.LSTMCell)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def quantized(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        return tq.quantize_dynamic(model, *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("spec", [None, "lstm only", "ours named"])
def test_quantize_dynamic(spec, dtype):
    """The modules nn.LSTM and nn.LSTMCell get, with the same outputs."""
    ref, ours = seqs()
    specs = {None: (None, None), "lstm only": ({nn.LSTM, nn.LSTMCell},) * 2,
             "ours named": ({nn.LSTM, nn.LSTMCell},
                            {lstm_fused.LSTM, lstm_fused.LSTMCell})}[spec]
    q_ref = quantized(ref, specs[0], dtype=dtype)
    q_ours = quantized(ours, specs[1], dtype=dtype)
    for name in ("lstm", "cell"):
        assert type(getattr(q_ours, name)) is type(getattr(q_ref, name))
        assert type(getattr(q_ref, name)).__module__.startswith(
            "torch.ao.nn.quantized.dynamic")
    assert type(q_ours.inp) is type(q_ref.inp)
    assert (type(q_ours.inp) is nn.Linear) == (spec is not None)
    x = torch.randn(5, 3, 4)
    for a, b in zip(q_ours(x), q_ref(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert type(ours.lstm) is lstm_fused.LSTM  # not in place


def test_quantize_dynamic_leaves_what_nn_lstm_leaves():
    """A spec without the LSTM types leaves ours float, as it leaves nn.LSTM."""
    ref, ours = seqs()
    q_ref, q_ours = quantized(ref, {nn.Linear}), quantized(ours, {nn.Linear})
    assert type(q_ref.lstm) is nn.LSTM and type(q_ours.lstm) is lstm_fused.LSTM
    assert type(q_ours.inp) is type(q_ref.inp) is not nn.Linear


def test_static_quantization():
    """prepare/convert turn ours, like nn.LSTM, into the quantized LSTM."""
    class Static(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.lstm = cls(4, 5)

        def forward(self, x):
            return self.dequant(self.lstm(self.quant(x))[0])
    torch.manual_seed(0)
    ref, ours = Static(nn.LSTM).eval(), Static(lstm_fused.LSTM).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (ref, ours):
            model.qconfig = tq.get_default_qconfig()
            prepared = tq.prepare(model)
            prepared(x)
            results.append(tq.convert(prepared))
    assert type(results[0].lstm) is type(results[1].lstm) is torch.ao.nn.quantized.LSTM
    torch.testing.assert_close(results[1](x), results[0](x), rtol=0, atol=0)


def test_import_needs_no_onnx():
    """`import lstm_fused` imports none of the ONNX packages (nor torch.onnx)."""
    code = ("import sys, lstm_fused\n"
            "print([m for m in ('onnx', 'onnxscript', 'onnxruntime', 'torch.onnx')"
            " if m in sys.modules])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def test_readme_commands(tmp_path, monkeypatch):
    """The README's "Deploy" commands, as written, on a model holding
    lstm_fused.LSTM: each output as nn.LSTM's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.lstm = cls(300, 8, num_layers=2, bidirectional=True)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            return y, h, c
    ref, model = Model(nn.LSTM).eval(), Model(lstm_fused.LSTM).eval()
    model.load_state_dict(ref.state_dict())
    monkeypatch.chdir(tmp_path)
    scope = {"torch": torch, "copy": __import__("copy"), "model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(readme_code("Deploy"), scope)  # noqa: S102
    assert type(scope["qmodel"].lstm) is torch.ao.nn.quantized.dynamic.LSTM
    assert type(model.lstm) is lstm_fused.LSTM  # scripted a copy
    x = torch.randn(9, 2, 300)
    with torch.no_grad():
        expected = ref(x)
        for got in (scope["traced"](x), scope["scripted"](x)):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, **TOL)
        assert scope["y"].shape == (9, 2, 16)
