#!/usr/bin/env bash
# The C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer: the op
# library and the tests built with -fsanitize=address,undefined (libtorch
# itself is not instrumented) in build/cmake-sanitize. Any finding fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# LeakSanitizer is on (libtorch reports no leaks here); UBSan stops at the
# first finding.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
BUILD_DIR=build/cmake-sanitize exec .ci/cmake_test.sh -DLSTM_FUSED_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
