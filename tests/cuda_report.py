"""Run tests/test_cuda.py and write the summary of a GPU run: device and
versions, pass counts per dtype, and the worst relative errors per dtype
(ours; for float16/bfloat16 also nn.LSTM's on the same inputs, the yardstick).

    python tests/cuda_report.py [--out cuda_report.md] [extra pytest args]

Exits with pytest's status.
"""
import argparse
import collections
import datetime
import os
import re
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float64", "float32", "float16", "bfloat16")


class Outcomes:
    """Counts test outcomes per dtype found in the test id."""

    def __init__(self):
        self.counts = collections.defaultdict(collections.Counter)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            found = re.search(r"\b(" + "|".join(DTYPES) + r")\b", report.nodeid)
            self.counts[found.group(1) if found else "other"][report.outcome] += 1


def versions():
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {p.name} (sm_{p.major}{p.minor}, "
                     f"{p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("- device: no CUDA GPU")
    lines.append(f"- TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cuda_report.md")
    args, extra = ap.parse_known_args()
    outcomes = Outcomes()
    status = pytest.main([os.path.join(HERE, "test_cuda.py"), "-q", "-p", "no:cacheprovider",
                          *extra], plugins=[outcomes])
    errors = getattr(sys.modules.get("test_cuda"), "ERRORS", [])

    md = ["# lstm_fused CUDA test log", ""] + versions() + [
        f"- `pytest tests/test_cuda.py`: exit status {int(status)}", "",
        "| dtype | passed | failed | skipped |", "| --- | --- | --- | --- |"]
    for d in DTYPES + ("other",):
        c = outcomes.counts.get(d)
        if c:
            md.append(f"| {d} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    md += ["", "Worst relative error (max |error| / max(1, max |reference|), over outputs, "
           "h_n, c_n and all gradients) per dtype:", "",
           "| dtype | cases | ours | nn.LSTM in the same dtype | worst ours / nn.LSTM |",
           "| --- | --- | --- | --- | --- |"]
    for d in DTYPES:
        rows = [e for e in errors if e["dtype"] == d]
        if not rows:
            continue
        ours = max(e["ours"] for e in rows)
        theirs = [e["theirs"] for e in rows if e["theirs"] is not None]
        ratio = max((e["ours"] / e["theirs"] for e in rows if e["theirs"]), default=None)
        md.append(f"| {d} | {len(rows)} | {ours:.3g} | "
                  + (f"{max(theirs):.3g}" if theirs else "-") + " | "
                  + (f"{ratio:.2f}" if ratio is not None else "-") + " |")
    text = "\n".join(md) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
