#!/usr/bin/env bash
# The official `openai` Python SDK (pinned, from PyPI, into build/serve-venv) against
# `cluster serve --block` on the golden tiny-qwen3 model. Usage: openai_sdk.sh PATH/TO/cluster GOLDEN
# Exit 77 = skipped (no golden data, or PyPI unreachable outside CI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cluster="$1" golden="${TROUPE_GOLDEN_DIR:-$2}"
if [ ! -f "$golden/models/tiny-qwen3/config.json" ]; then
  echo "SKIP: golden data not found at $golden"; [ "${CI:-}" = "true" ] && exit 1; exit 77
fi
venv="$(dirname "$cluster")/../serve-venv"
pin="openai==3.54.0"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pin" ]; then
  python3 -m venv "$venv"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "$pin"; then
    echo "SKIP: cannot install $pin from PyPI"; [ "${CI:-}" = "true" ] && exit 1; exit 77
  fi
  echo "$pin" >"$venv/.pins"
fi
exec "$venv/bin/python" "$here/openai_sdk.py" "$cluster" "$golden"
