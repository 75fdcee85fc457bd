#!/usr/bin/env bash
# The whole test suite: dependencies, the debug build (AddressSanitizer + UBSan), then every
# CTest test. Extra arguments go to ctest (e.g. -L cpu, -R golden).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset debug
cmake --build --preset debug
# protect_shadow_gap=0 lets the CUDA runtime map its memory under ASan where CUDA is linked in.
export ASAN_OPTIONS="${ASAN_OPTIONS:-protect_shadow_gap=0}"
ctest --preset debug "$@"
