#!/usr/bin/env bash
# CI: build the op library and the C++ tests with CMake against the installed
# torch, then run them with ctest. Extra arguments go to the cmake configure
# step (e.g. -DLSTM_FUSED_CUDA=ON). Build dir: $BUILD_DIR or build/cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build/cmake}
command -v cmake >/dev/null || python -m pip install -q cmake
prefix=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
if [ -f "$build/CMakeCache.txt" ]; then gen=(); fi  # keep the cached generator
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_PREFIX_PATH="$prefix" "$@"
cmake --build "$build" --parallel "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$build" --output-on-failure
