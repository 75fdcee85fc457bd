#!/usr/bin/env bash
# The main job: builds troupe (release) and runs the embedded default model on one request.
# Until serving lands this is offline greedy generation on the CPU backend, using the golden
# tiny Qwen3 model ($TROUPE_GOLDEN_DIR, or ../shared/golden beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target cluster
golden="${TROUPE_GOLDEN_DIR:-$(cd .. && pwd)/shared/golden}"
model="${TROUPE_MODEL:-$golden/models/tiny-qwen3}"
if [ ! -f "$model/config.json" ]; then
  echo "run.sh: no model at $model (set TROUPE_MODEL or TROUPE_GOLDEN_DIR)" >&2
  exit 1
fi
exec ./build/release/cli/cluster generate --model "$model" \
  --prompt-ids 9707,11,1879,0,3555,374,279,6722,315,9625,30 --max-tokens 24 "$@"
