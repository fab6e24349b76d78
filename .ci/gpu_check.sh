#!/usr/bin/env bash
# The GPU check, for the day a GPU is lent (one command, about 8 minutes on
# an H200 with 16 cores): build the CUDA extension with every core, run the
# GPU tests (tests/test_cuda.py with each CUDA engine, the persistent one
# through tests/cuda_report.py; tests/test_capture.py, tests/cuda_emu_cases.py), compute-sanitizer memcheck and racecheck on
# tests/cuda_smoke.py (both engines), and the GPU benchmark grid; everything
# lands in one folder ready to commit:
#   report.md          versions (GPU, driver, torch, CUDA, cuDNN, nvcc), what ran, pass/fail
#   cuda_report.md     tests/cuda_report.py: pass counts and worst errors per dtype
#   bench.{json,md,png}  python -m lstm_fused.bench --grid gpu
#   logs.tar.gz        every step's full output
# (at most 8 files: what the device tool brings back from $OUT.)
#
#   bash .ci/gpu_check.sh [OUT_DIR]     # default: $OUT, else gpu_check_out
#   GPU_CHECK_DRY=1 bash .ci/gpu_check.sh   # no GPU: report what would run, run the rest
#
# Without a GPU (or with GPU_CHECK_DRY=1) every step that needs one is
# listed as skipped (its command checked to exist) and the bench runs its
# smoke grid on the CPU; the report is still written. The exit status is 0 only
# when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${1:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$DEST"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
REPORT=$DEST/report.md
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
failed=0
results=()

has_gpu() {
  [ "${GPU_CHECK_DRY:-0}" != "1" ] && "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}
GPU=0
has_gpu && GPU=1

# step NAME NEEDS_GPU COMMAND...: runs it (output to LOGS/NAME.log), records the outcome.
step() {
  local name=$1 needs=$2
  shift 2
  if [ "$needs" = gpu ] && [ "$GPU" != 1 ]; then
    if type "$1" > /dev/null 2>&1; then
      results+=("| $name | skipped (no GPU) | \`$*\` |")
      echo "== $name: skipped (no GPU)"
    else
      results+=("| $name | **FAILED**: no command $1 | \`$*\` |")
      echo "== $name: FAILED: no command $1"
      failed=1
    fi
    return 0
  fi
  echo "== $name: $*"
  local t=$SECONDS
  if "$@" > "$LOGS/$name.log" 2>&1; then
    results+=("| $name | passed ($((SECONDS - t)) s) | \`$*\` |")
    echo "   passed ($((SECONDS - t)) s)"
  else
    results+=("| $name | **FAILED** ($((SECONDS - t)) s, see logs/$name.log) | \`$*\` |")
    echo "   FAILED ($((SECONDS - t)) s); last lines:"
    tail -n 20 "$LOGS/$name.log"
    failed=1
  fi
}

versions() {
  "$PY" - <<'EOF'
import platform, subprocess, torch
print(f"- host: {platform.node()}, {platform.processor() or platform.machine()}, "
      f"Python {platform.python_version()}")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"compute capability {p.major}.{p.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout
        print(f"- driver, max SM clock: {smi.strip()}")
    except OSError:
        pass
else:
    print("- GPU: none visible")
EOF
  echo "- nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || echo none)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
}

# The extension: the CUDA build for the GPU present (sm_90 on an H200), every core.
build() {
  local arch
  arch=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")')
  TORCH_CUDA_ARCH_LIST=$arch LSTM_FUSED_FORCE_CUDA=1 MAX_JOBS=$(nproc) NVCC_THREADS=4 \
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e "$ROOT" &&
    "$PY" -c 'import torch, lstm_fused; assert torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", "CUDA"), "no CUDA kernels"; print(lstm_fused.__file__)'
}

engine_tests() {  # tests/test_cuda.py with one CUDA engine
  LSTM_FUSED_CUDA_ENGINE=$1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
}

sanitize() {  # compute-sanitizer TOOL on tests/cuda_smoke.py with ENGINE
  PYTHONPATH=$ROOT LSTM_FUSED_CUDA_ENGINE=$2 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$1" --error-exitcode 1 "$PY" tests/cuda_smoke.py
}

step build gpu build
step tests-persistent gpu env LSTM_FUSED_CUDA_ENGINE=persistent \
  "$PY" tests/cuda_report.py --out "$DEST/cuda_report.md"
step tests-step gpu engine_tests step
step capture gpu "$PY" -m pytest -q -p no:cacheprovider tests/test_capture.py tests/cuda_emu_cases.py
step memcheck-persistent gpu sanitize memcheck persistent
step memcheck-step gpu sanitize memcheck step
step racecheck-persistent gpu sanitize racecheck persistent
step racecheck-step gpu sanitize racecheck step
bench_args=(--no-progress --out "$LOGS/bench" --json "$DEST/bench.json" --md "$DEST/bench.md"
            --png "$DEST/bench.png")
if [ "$GPU" = 1 ]; then
  step bench gpu "$PY" -m lstm_fused.bench --grid gpu "${bench_args[@]}"
else  # the plumbing of the bench and this report, on the CPU
  step bench-dry cpu "$PY" -m lstm_fused.bench --grid smoke --device cpu --repeats 3 \
    "${bench_args[@]}"
fi

{
  echo "# GPU check"
  echo
  versions
  echo "- total: $((SECONDS - START)) s$([ "$GPU" = 1 ] || echo '; no GPU: a dry run')"
  echo
  echo "| step | outcome | command |"
  echo "|---|---|---|"
  printf '%s\n' "${results[@]}"
  if [ -f "$DEST/bench.md" ]; then
    echo
    sed -n '/^- /p' "$DEST/bench.md"
  fi
} > "$REPORT"
tar -czf "$DEST/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
cat "$REPORT"
exit $failed
