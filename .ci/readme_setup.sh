#!/usr/bin/env bash
# CI, first stage: the README's two set-up commands (the two ```bash blocks
# under "## Set up", read by .ci/readme_commands.py, so README and CI cannot
# drift), run verbatim as a newcomer does: in a fresh venv without torch, with no
# CUDA_HOME and none of our build switches set. Where this machine has an
# nvcc of the CUDA major version of the torch the README installed, the build
# must be the CUDA extension (lstm_fused.build_info()), else CPU-only.
#   LSTM_FUSED_README_VENV  the venv, recreated each run (default .venv-readme)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LSTM_FUSED_README_VENV:-$PWD/.venv-readme}

mapfile -d '' cmds < <(python3 .ci/readme_commands.py)
[ "${#cmds[@]}" -eq 2 ] || exit 1

rm -rf "$VENV"
python3 -m venv "$VENV"
for cmd in "${cmds[@]}"; do
  echo "== README: $cmd"
  start=$SECONDS
  env -u CUDA_HOME -u CUDA_PATH -u LSTM_FUSED_FORCE_CUDA -u LSTM_FUSED_FORCE_CPU \
    -u TORCH_CUDA_ARCH_LIST -u PYTHONPATH VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" \
    bash -eo pipefail -c "$cmd"
  echo "== README command took $((SECONDS - start)) s"
done

# What the build should be, found without build_support/cuda_detect.py.
nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || nvcc=/usr/local/cuda/bin/nvcc
"$VENV/bin/python" - "$nvcc" <<'EOF'
import re, subprocess, sys
import torch, lstm_fused
info = lstm_fused.build_info()
print("== build_info:", info)
nvcc = sys.argv[1]
release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True,
                    text=True).stdout) if nvcc else None
expect = bool(release and torch.version.cuda and release[1] == torch.version.cuda.split(".")[0])
assert info["cuda"] == expect, (f"expected the {'CUDA' if expect else 'CPU-only'} extension "
                                f"(torch CUDA {torch.version.cuda}, nvcc {nvcc}): {info['reason']}")
EOF
