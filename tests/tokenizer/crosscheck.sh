#!/usr/bin/env bash
# CTest entry for the live cross-checks against Hugging Face `tokenizers` and, for chat templates,
# Jinja2 configured as transformers does (PyPI, pinned in
# scripts/py_venv.sh). Without the venv or the golden data: exit 77 (skip) with the reason, except
# under CI=true, where that is a failure. Usage: crosscheck.sh PATH/TO/tokenizer_tool
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
skip() {
  echo "SKIP: $*"
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  exit 77
}
golden="${TROUPE_GOLDEN_DIR:-$root/../shared/golden}"
[ -d "$golden/tokenizers" ] || skip "golden data not found at $golden"
python="$("$root/scripts/py_venv.sh")" || skip "could not set up the Python venv with tokenizers from PyPI"
status=0
for name in qwen3 llama3; do
  "$python" "$here/crosscheck.py" --tool "$1" --tokenizer "$golden/tokenizers/$name/tokenizer.json" \
    --count 6000 --seed 20261123 || status=1
  "$python" "$here/chat_crosscheck.py" --tool "$1" --model-dir "$golden/tokenizers/$name" || status=1
done
exit $status
