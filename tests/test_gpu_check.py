"""The one-command GPU check (.ci/gpu_check.sh) as far as it runs without a
GPU: its dry run lists every GPU step as skipped, runs the bench's smoke grid
on the CPU and writes the report and the files to commit."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_STEPS = ["build", "tests-persistent", "tests-step", "capture", "memcheck-persistent",
             "memcheck-step", "racecheck-persistent", "racecheck-step"]


def test_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / ".ci" / "gpu_check.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for name in GPU_STEPS:
        assert f"| {name} | skipped (no GPU) |" in report
    assert "| bench-dry | passed" in report
    assert "torch " in report and "no GPU: a dry run" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.json", "bench.md", "bench.png", "logs.tar.gz", "report.md"]
    assert "geometric-mean speed-up" in report  # the bench summary, carried into the report
