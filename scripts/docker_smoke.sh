#!/usr/bin/env bash
# Builds a troupe image and smoke-tests it: serves the default model (SmolLM2-135M-Instruct GGUF,
# scripts/fetch_smollm2.sh) from the container, waits for /health, asks one chat question (the
# answer must name Paris), checks /metrics, then `docker stop` (SIGTERM) must exit 0.
# Usage: scripts/docker_smoke.sh [cpu|cuda]   (cuda needs the NVIDIA container runtime)
# Exit 77: docker is not available here.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-cpu}"
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  echo "SKIP: docker is not available"; exit 77
fi
file=packaging/docker/Dockerfile gpus=()
if [ "$kind" = cuda ]; then file=packaging/docker/Dockerfile.cuda gpus=(--gpus all); fi
image="troupe:$kind"
docker build -f "$file" -t "$image" .
gguf="$(./scripts/fetch_smollm2.sh)"
name="troupe-smoke-$$"
docker run -d --name "$name" "${gpus[@]}" -p 127.0.0.1::8000 -v "$(dirname "$gguf"):/models:ro" \
  "$image" serve "/models/$(basename "$gguf")" --block --host 0.0.0.0 --port 8000 \
  --max-model-len 1024 >/dev/null
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
port="$(docker port "$name" 8000 | head -n 1 | sed 's/.*://')"
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
answer="$(curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0}')"
echo "$answer"
grep -q Paris <<<"$answer" || { echo "FAIL: no Paris"; docker logs "$name"; exit 1; }
curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^vllm:num_requests_running' \
  || { echo "FAIL: /metrics"; exit 1; }
docker stop -t 40 "$name" >/dev/null
rc="$(docker inspect -f '{{.State.ExitCode}}' "$name")"
[ "$rc" = 0 ] || { echo "FAIL: exit $rc after SIGTERM"; docker logs "$name"; exit 1; }
docker logs "$name" 2>&1 | grep -q '"device: auto -> ' || { echo "FAIL: no device line"; exit 1; }
echo "PASS: $image serves, answers and stops cleanly"
