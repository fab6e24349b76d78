#!/usr/bin/env bash
# CI, CUDA half: build the real CUDA extension (no GPU needed) against the
# CUDA build of torch in its own venv, check that the CUDA kernels are
# registered, and run the CPU test suite against that build. The build runs in
# a copy of the tree, so this clone's CPU-only editable build stays as it is.
# Skips (exit 0) only when the machine has no nvcc; any other failure fails.
#   LSTM_FUSED_CUDA_VENV  venv to create or reuse (default .venv-cu in the clone)
#   CUDA_HOME             toolkit (default /usr/local/cuda-13.0, else one found)
#   MAX_JOBS              parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1

for home in "${CUDA_HOME:-}" /usr/local/cuda-13.0 /usr/local/cuda \
            "$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")"; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then CUDA_HOME=$home; break; fi
done
if [ ! -x "${CUDA_HOME:-/none}/bin/nvcc" ]; then
  echo "== CUDA build skipped: no nvcc on this machine (set CUDA_HOME to a CUDA toolkit)"
  exit 0
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

VENV=${LSTM_FUSED_CUDA_VENV:-$ROOT/.venv-cu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
# torch 2.14.1 on PyPI is the CUDA 13.0 build (5.4 GB; from the local cache here).
"$PY" -m pip install -q torch==2.14.1 numpy ninja pytest hypothesis setuptools wheel

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lstm_fused_cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK"
else
  tar --exclude=./build --exclude='*.so' --exclude='./.venv*' --exclude='./venv*' \
    -cf - . | tar -xf - -C "$WORK"
fi
cd "$WORK"

echo "== CUDA build (sm_80, sm_90) with $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
start=$SECONDS
TORCH_CUDA_ARCH_LIST="8.0;9.0" LSTM_FUSED_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip install -q --no-build-isolation -e .
echo "== CUDA build took $((SECONDS - start)) s"

"$PY" - "$WORK" <<'EOF'
import os, sys
import torch
import lstm_fused
assert os.path.realpath(lstm_fused.__file__).startswith(os.path.realpath(sys.argv[1])), \
    f"imported {lstm_fused.__file__}, not the CUDA build"
for op in ("layer_forward", "layer_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{op}", key), \
            f"lstm_fused::{op} has no {key} kernel"
print("== CUDA and CPU kernels registered:", lstm_fused._C.__file__)
EOF

echo "== CPU test suite against the CUDA build"
"$PY" -m pytest tests -q -p no:cacheprovider
