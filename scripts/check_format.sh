#!/usr/bin/env bash
# Fails when a C++/CUDA source differs from what clang-format (the repo's .clang-format) makes
# of it; prints the files. `cmake --build build/debug --target format` rewrites them.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files 'runtime/*' 'engine/*' 'cluster/*' 'http/*' 'actors/*' 'cli/*' \
                       'tests/*' 'bench/*' 'fuzz/*' | grep -E '\.(cpp|hpp|cu|cuh)$')
bad=()
for f in "${files[@]}"; do
  [ -f "$f" ] || continue
  if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if [ "${#bad[@]}" -ne 0 ]; then
  printf 'format: %s differs from clang-format\n' "${bad[@]}" >&2
  exit 1
fi
echo "format: ok (${#files[@]} files)"
