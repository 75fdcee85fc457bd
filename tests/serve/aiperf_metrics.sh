#!/usr/bin/env bash
# NVIDIA's aiperf (pinned, from PyPI, into build/aiperf-venv) benchmarks `cluster serve --block` on
# the golden tiny-qwen3 model and collects its server metrics from /metrics (aiperf probes the
# endpoint first and silently skips collection if that probe fails): the export must hold vLLM's
# families. Usage: aiperf_metrics.sh PATH/TO/cluster GOLDEN
# Exit 77 = skipped (no golden data, or PyPI unreachable outside CI).
set -euo pipefail
cluster="$1" golden="${TROUPE_GOLDEN_DIR:-$2}"
skip() { echo "SKIP: $1"; [ "${CI:-}" = "true" ] && exit 1; exit 77; }
[ -f "$golden/models/tiny-qwen3/config.json" ] || skip "golden data not found at $golden"
venv="$(dirname "$cluster")/../aiperf-venv"
pin="aiperf==0.13.0"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pin" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$pin" || skip "cannot install $pin"
  echo "$pin" >"$venv/.pins"
fi
work="$(mktemp -d)"
"$cluster" serve "$golden/models/tiny-qwen3" --block --port 0 --device cpu --served-model-name tiny \
  --max-model-len 512 >"$work/serve.out" 2>"$work/serve.err" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do grep -q "serving 'tiny' at" "$work/serve.out" && break; sleep 0.5; done
url="$(grep -o 'http://[^ ]*/v1' "$work/serve.out" | sed 's|/v1$||')"
[ -n "$url" ] || { echo "FAIL: no endpoint"; cat "$work/serve.err"; exit 1; }
"$venv/bin/aiperf" profile --model tiny --url "$url" --endpoint-type chat --streaming \
  --request-count 6 --concurrency 2 --tokenizer "$golden/tokenizers/qwen3" \
  --synthetic-input-tokens-mean 32 --output-tokens-mean 8 --artifact-dir "$work/out" \
  >"$work/aiperf.log" 2>&1 || { tail -40 "$work/aiperf.log"; echo "FAIL: aiperf"; exit 1; }
grep -q "1/1 endpoint(s) reachable" "$work/out/logs/aiperf.log" \
  || { grep -i "server metrics" "$work/out/logs/aiperf.log"; echo "FAIL: metrics not collected"; exit 1; }
for m in vllm:num_requests_running vllm:time_to_first_token_seconds vllm:request_success; do
  grep -q "$m" "$work/out/server_metrics_export.json" || { echo "FAIL: $m not exported"; exit 1; }
done
echo "PASS: aiperf collected the server's metrics"
