#!/usr/bin/env bash
# End to end: `cluster generate --chat` and `--prompt` on the golden tiny-qwen3 model must feed the
# prompt ids Hugging Face produces (golden/expected/qwen3_*.json). Usage: cli_chat.sh PATH/TO/cluster
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
golden="${TROUPE_GOLDEN_DIR:-$here/../../../shared/golden}"
if [ ! -f "$golden/models/tiny-qwen3/config.json" ]; then
  echo "SKIP: golden data not found at $golden"
  [ "${CI:-}" = "true" ] && exit 1
  exit 77
fi
expect() { python3 -c "import json,sys; c=json.load(open(sys.argv[1]))[int(sys.argv[2])]; print(','.join(map(str,c['ids'])))" "$@"; }
check() { # $1 = expected ids, rest = cluster arguments
  local want="$1"; shift
  local out; out="$("$cluster" generate --model "$golden/models/tiny-qwen3" --max-tokens 2 "$@")"
  echo "$out"
  grep -qx "prompt ids: $want" <<<"$out" || { echo "FAIL: expected prompt ids $want"; exit 1; }
  grep -q "^generated text: " <<<"$out" || { echo "FAIL: no generated text"; exit 1; }
}
cluster="$1"
check "$(expect "$golden/expected/qwen3_chat.json" 0)" --chat "$(python3 -c "import json;print(json.load(open('$golden/expected/qwen3_chat.json'))[0]['messages'][0]['content'])")"
check "$(expect "$golden/expected/qwen3_encode.json" 0)" --prompt "Hello, world!"
