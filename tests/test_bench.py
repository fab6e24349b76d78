"""The benchmark's outputs on tiny shapes: JSON schema, parity figures, table, plot, compare.
No timing is asserted."""
import contextlib
import copy
import io
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import lstm_fused
from lstm_fused import bench

REPEATS = 2
ROOT = Path(__file__).resolve().parent.parent
STAT_KEYS = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms")
ENV_KEYS = {"date": str, "machine": str, "device": str, "device_name": str, "cpu_model": str,
            "cpu_isa": str, "cpu_count": int, "threads": int, "python": str, "platform": str, "torch": str,
            "lstm_fused": str, "ours_kernel": bool, "has_lstmcell": bool, "tf32": bool}
TOL = {"fp64": 1e-10, "fp32": 1e-5}


def _call(fn, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn(*args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (fp64 and fp32, both modes, 1 thread) into a temporary folder."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    rc, stdout, stderr = _call(bench.main, [
        "--grid", "smoke", "--dtypes", "fp64,fp32", "--repeats", str(REPEATS), "--warmup", "1",
        "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0, stderr
    assert torch.get_num_threads() == threads  # main leaves the thread count as it was
    files = {p.suffix: p for p in out.iterdir()}
    return dict(out=out, stdout=stdout, files=files,
                result=json.loads(files[".json"].read_text()))


def test_outputs_written(smoke):
    assert set(smoke["files"]) >= {".json", ".md"}
    assert all(p.stem.startswith("bench-") for p in smoke["files"].values())
    assert "| case | mode | dtype | ours ms | torch ms |" in smoke["files"][".md"].read_text()


def test_schema(smoke):
    r = smoke["result"]
    assert r["schema"] == bench.SCHEMA
    env = r["environment"]
    for key, typ in ENV_KEYS.items():
        assert isinstance(env[key], typ), key
    assert env["device"] == "cpu" and env["threads"] == 1 and env["tf32"] is False
    assert env["torch"] == torch.__version__ and env["ours_kernel"] is True
    assert env["has_lstmcell"] == hasattr(lstm_fused, "LSTMCell")
    for key in ("git_commit", "git_dirty", "cuda", "cudnn"):
        assert key in env
    cfg = r["config"]
    assert cfg["grid"] == "smoke" and cfg["dtypes"] == ["fp64", "fp32"]
    assert cfg["modes"] == ["inference", "train"] and cfg["repeats"] == REPEATS
    assert cfg["refs"] == ["torch"]
    assert isinstance(r["wall_s"], float) and r["wall_s"] > 0

    kinds = {"seq", "decode"} | ({"decode-cell"} if env["has_lstmcell"] else set())
    assert {c["kind"] for c in r["cases"]} == kinds
    # every smoke shape in every mode and dtype, once
    keys = [(c["id"], c["mode"], c["dtype"]) for c in r["cases"]]
    shapes = [c for c in bench.GRIDS["smoke"] if c.kind in kinds]
    assert len(keys) == len(set(keys)) == len(shapes) * 2 * 2
    for c in r["cases"]:
        assert c["error"] is None, c["error"]
        assert set(c["shape"]) == {"T", "B", "I", "H", "layers", "bidir", "lengths", "frozen"}
        assert c["unit"] == ("ms per call" if c["kind"] == "seq" else "ms per step")
        assert set(c["impls"]) == {"ours", "torch"}
        for s in c["impls"].values():
            assert len(s["times_ms"]) == REPEATS
            assert all(isinstance(t, float) and t > 0 for t in s["times_ms"])
            assert s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
            assert s["min_ms"] == min(s["times_ms"]) and s["max_ms"] == max(s["times_ms"])
            assert s["peak_mem_bytes"] is None or s["peak_mem_bytes"] >= 0
        assert c["speedup"] == pytest.approx(
            c["impls"]["torch"]["median_ms"] / c["impls"]["ours"]["median_ms"])
        assert c["speedup_vs"] == {"torch": c["speedup"]}
        assert isinstance(c["parity"]["output"], float)
        assert (c["parity"]["grad_input"] is None) == (c["mode"] == "inference")
        assert (c["parity"]["grad_weights"] is None) == (c["mode"] == "inference")
    packed = [c for c in r["cases"] if c["shape"]["lengths"]]
    assert packed and all(c["shape"]["lengths"] == [2, 6] for c in packed)


def test_parity_figures(smoke):
    for c in smoke["result"]["cases"]:
        for what, err in c["parity"].items():
            if err is not None:
                assert 0 <= err < TOL[c["dtype"]], (c["name"], c["mode"], c["dtype"], what)


def test_stdout_table(smoke):
    lines = smoke["stdout"].splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| case")]
    assert len(rows) == len(smoke["result"]["cases"])
    for c in smoke["result"]["cases"]:
        assert any(ln.startswith(f"| {c['name']} | {c['mode']} | {c['dtype']} |")
                   and f"{c['speedup']:.2f}×" in ln for ln in rows)
    assert "geometric-mean speed-up" in smoke["stdout"]


def test_png(smoke):
    pytest.importorskip("matplotlib")
    png = smoke["files"][".png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _faster(result, factor):
    """result with our times multiplied by factor."""
    r = copy.deepcopy(result)
    for c in r["cases"]:
        s = c["impls"]["ours"]
        for k in STAT_KEYS:
            s[k] *= factor
    return r


def test_compare(smoke, tmp_path):
    old = smoke["files"][".json"]
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_faster(smoke["result"], 0.5)))
    rc, out, _ = _call(bench.main, ["compare", str(old), str(new)])
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "new/old" not in ln]
    assert len(rows) == len(smoke["result"]["cases"])
    for ln in rows:
        cells = [x.strip() for x in ln.strip("|").split("|")]
        assert cells[5] == "0.50" and cells[6] == "1.00" and cells[9] == "+100%", ln
    assert "geometric mean of our time new/old: 0.500" in out


def test_compare_script(smoke, tmp_path, monkeypatch):
    old = str(smoke["files"][".json"])
    monkeypatch.setattr(sys, "argv", ["bench/compare.py", old, old])
    with pytest.raises(SystemExit) as e:
        _call(runpy.run_path, str(ROOT / "bench" / "compare.py"), None, "__main__")
    assert e.value.code == 0


def test_compare_disjoint(smoke, tmp_path):
    r = copy.deepcopy(smoke["result"])
    for c in r["cases"]:
        c["id"] += "-other"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(r))
    rc, out, _ = _call(bench.compare_main, [str(smoke["files"][".json"]), str(other)])
    assert rc == 0 and "no case in common" in out


def _malformed(smoke):
    r = smoke["result"]
    no_median = copy.deepcopy(r)
    del no_median["cases"][0]["impls"]["ours"]["median_ms"]
    no_id = copy.deepcopy(r)
    del no_id["cases"][1]["id"]
    return {"not json": "{\"cases\": [", "a list": "[1, 2]",
            "no cases": json.dumps({"environment": {}}),
            "no median": json.dumps(no_median), "no id": json.dumps(no_id)}


@pytest.mark.parametrize("what", ["not json", "a list", "no cases", "no median", "no id",
                                  "missing file"])
def test_compare_rejects_malformed(smoke, tmp_path, what):
    bad = tmp_path / "bad.json"
    if what != "missing file":
        bad.write_text(_malformed(smoke)[what])
    good = str(smoke["files"][".json"])
    for args in ([good, str(bad)], [str(bad), good]):
        rc, out, err = _call(bench.compare_main, args)
        assert rc == 2 and err.startswith("error: ") and str(bad) in err and out == ""


def test_results_name(smoke):
    """--save-results files: the machine for the default run, plus what
    differs from it, so that a float64 or custom run never replaces the
    grid's committed files."""
    r = copy.deepcopy(smoke["result"])
    machine = r["environment"]["machine"]
    assert bench.results_name(r, gpu=False) == f"{machine}-smoke-fp64-fp32"
    r["config"].update(grid="cpu", dtypes=["fp32"])
    assert bench.results_name(r, gpu=False) == machine
    assert bench.results_name(r, gpu=False, decode_steps=200) == f"{machine}-decode200"
    r["config"]["dtypes"] = ["fp64"]
    assert bench.results_name(r, gpu=False) == f"{machine}-fp64"
    r["config"].update(grid="custom", dtypes=["fp32"])
    assert bench.results_name(r, gpu=False) == f"{machine}-custom"
    r["config"].update(grid="gpu", dtypes=["fp32", "fp16", "bf16"])
    assert bench.results_name(r, gpu=True) == machine
    assert bench.results_name(r, gpu=False) == f"{machine}-gpu-fp32-fp16-bf16"


def test_parse_case():
    assert bench._parse_case("100,64,512,512,packed=10-100") == bench.Case(
        100, 64, 512, 512, lengths=(10, 100))
    c = bench._parse_case("10,2,3,4,2,bidir")
    assert (c.layers, c.bidir, c.name) == (2, True, "T10 B2 I3 H4 L2 bidir")
    c = bench._parse_case("10,2,3,4,2,bidir,frozen")
    assert c.frozen and c.name == "T10 B2 I3 H4 L2 bidir frozen input"
    with pytest.raises(Exception):
        bench._parse_case("10,2,3,4,sideways")


def test_frozen_input_case(tmp_path):
    """An input that needs no gradient: no input-gradient parity, the
    parameters' instead (shown as dW in the table)."""
    rc, out, err = _call(bench.main, [
        "--case", "4,3,5,6,2,bidir,frozen", "--modes", "train", "--dtypes", "fp64",
        "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, err
    (c,) = json.loads(next(tmp_path.glob("*.json")).read_text())["cases"]
    assert c["shape"]["frozen"] is True and c["parity"]["grad_input"] is None
    assert 0 <= c["parity"]["grad_weights"] < TOL["fp64"]
    assert "| dW " in next(tmp_path.glob("*.md")).read_text()


def test_custom_case_and_filter(tmp_path):
    """--case replaces the grid; --filter selects; --decode-steps sets decode length."""
    rc, out, err = _call(bench.main, [
        "--case", "3,2,4,5", "--modes", "train", "--repeats", "1", "--threads", "1",
        "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, err
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(c["name"], c["mode"]) for c in r["cases"]] == [("T3 B2 I4 H5", "train")]
    assert r["config"]["grid"] == "custom"
    rc, out, err = _call(bench.main, [
        "--grid", "smoke", "--filter", "decode L2", "--decode-steps", "3", "--modes",
        "inference", "--repeats", "1", "--threads", "1", "--no-progress",
        "--json", str(tmp_path / "d.json"), "--out", str(tmp_path)])
    assert rc == 0, err
    r = json.loads((tmp_path / "d.json").read_text())
    assert [(c["kind"], c["shape"]["T"]) for c in r["cases"]] == [("decode", 3)]


def test_bad_arguments():
    for args in (["--modes", "sideways"], ["--dtypes", "fp8"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            _call(bench.main, args)
        assert e.value.code == 2


def test_failing_case_is_recorded(monkeypatch):
    """A case that raises is recorded with its error; the run goes on."""
    monkeypatch.delattr(lstm_fused, "LSTMCell", raising=False)
    case = bench.Case(3, 2, 4, 4, 2, kind="decode-cell")
    c = bench.run_case(case, "inference", torch.float32, torch.device("cpu"), [], 1, 1)
    assert c["error"] == "RuntimeError: lstm_fused.LSTMCell does not exist yet"
    assert c["impls"] == {} and c["speedup"] is None
    result = {"config": {"refs": ["torch"], "modes": ["inference"], "dtypes": ["fp32"]},
              "cases": [c]}
    assert f"| {case.name} | inference | fp32 | error: RuntimeError" in bench.table(result)
    assert bench.summary(result) == ""


def test_engine_column_on_the_gpu():
    """A GPU result's table says which CUDA kernels ran (lstm_fused.cuda_plan)."""
    assert bench._engine_short(None) == "—"
    persistent = "persistent: 128 blocks x 8 units, 150 KB shared memory per block"
    assert bench._engine_short({"forward": persistent, "backward": persistent}) == \
        "persistent 128×8"
    assert bench._engine_short({"forward": persistent, "backward": "per-step"}) == \
        "persistent 128×8 / per-step"
    case = {"name": "T10 B2", "mode": "train", "dtype": "bf16", "error": None,
            "engine": {"forward": persistent, "backward": persistent}, "speedup": 2.0,
            "speedup_vs": {}, "parity": {"output": 1e-3, "grad_input": 1e-3},
            "impls": {n: {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.0, "peak_mem_bytes": 0}
                      for n in ("ours", "torch")}}
    result = {"environment": {"device": "cuda"}, "config": {"refs": ["torch"]}, "cases": [case]}
    lines = bench.table(result).splitlines()
    assert lines[0].endswith("| engine |") and lines[2].endswith("| persistent 128×8 |")
