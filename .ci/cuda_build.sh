#!/usr/bin/env bash
# Build the real CUDA extension (no GPU needed) against the CUDA build of
# torch in its own venv, check that the CUDA kernels are registered, and run
# the CPU test suite against that build. The build runs in a copy of the tree,
# so this clone's CPU-only editable build stays as it is. Not part of .ci/run,
# whose README stage builds the CUDA extension already; for a check by hand.
# Skips (exit 0) only when the machine has no nvcc; where setup.py finds no
# usable toolkit (LSTM_FUSED_FORCE_CUDA=1), it fails and names what is missing.
#   LSTM_FUSED_CUDA_VENV  venv to create or reuse (default .venv-cu in the clone)
#   CUDA_HOME             toolkit (default: the one setup.py finds)
#   MAX_JOBS              parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ] \
   && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "== CUDA build skipped: no nvcc on this machine (set CUDA_HOME to a CUDA toolkit)"
  exit 0
fi

VENV=${LSTM_FUSED_CUDA_VENV:-$ROOT/.venv-cu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
# torch 2.14.1 on PyPI is the CUDA 13.0 build (5.4 GB; from the local cache here).
"$PY" -m pip install -q torch==2.14.1 numpy ninja pytest hypothesis matplotlib setuptools wheel

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

echo "== CUDA build (sm_80, sm_90) with $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
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
print("== CUDA and CPU kernels registered:", lstm_fused._C.__file__, lstm_fused.build_info())
EOF

echo "== CPU test suite against the CUDA build"
"$PY" -m pytest tests -q -p no:cacheprovider
