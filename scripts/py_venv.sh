#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment the reference cross-checks and the tokenizer
# benchmark use: build/pyenv with pinned PyPI packages. Prints the venv's python on success.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="build/pyenv"
pins=(tokenizers==0.23.3 jinja2==3.1.6 prometheus_client==0.21.1)
stamp="$venv/.pins"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
  echo "$PWD/$venv/bin/python"
  exit 0
fi
mkdir -p build
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
echo "${pins[*]}" >"$stamp"
echo "$PWD/$venv/bin/python"
