#!/usr/bin/env bash
# Prefill/decode disaggregation on the lent GPU: a random-weight Qwen3 model of a real shape
# (bench/make_random_qwen3.py) served by `cluster serve --block` with device: cuda, colocated and
# then 1P1D on the same GPU (each group half of gpu_memory_utilization, KV moved by device copies),
# in the same call. For each prompt length (LENS, default "512 2048 8192") serve_bench sends
# requests one at a time (N each, OUT_LEN output tokens): the TTFT difference is what the handoff
# adds; /metrics gives the bytes moved and the transfer time, hence GB/s, which is set against the
# device-to-device copy bandwidth measured in the same call (a torch copy of 1 GiB). The greedy
# token ids of both runs are compared. Logs go to $OUT.
# Usage: bench/device_disagg.sh [qwen3-8b|qwen3-0.6b]   (TROUPE_BUNDLE: the bundle, dist/troupe)
set -uo pipefail
shape=${1:-qwen3-8b}
out=${OUT:-/tmp}
bin=${TROUPE_BUNDLE:-dist/troupe}/bin
here=$(dirname "$0")
for lib in libcudart.so.13 libcublasLt.so.13 libnccl.so.2; do
  dir=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
  [ -n "$dir" ] || dir=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
  [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
lens=${LENS:-512 2048 8192}
out_len=${OUT_LEN:-16}
n=${N:-6}
model=/tmp/troupe-$shape
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
[ -f "$model/config.json" ] || python3 "$here/make_random_qwen3.py" "$shape" "$model" dist/golden/tokenizers/qwen3 \
  2>&1 | grep -v Warning | tail -2
# Device-to-device copy bandwidth (the bound for a same-GPU handoff), 1 GiB, best of 5.
python3 - <<'PY' 2>&1 | tee "$out/d2d.txt"
import torch, time
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
best = 1e9
for _ in range(6):
    torch.cuda.synchronize(); t = time.perf_counter(); b.copy_(a); torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
print(f"d2d copy: {(1 << 30) / best / 1e9:.1f} GB/s (read+write of 1 GiB, best of 6)")
PY
# The value of metric $2 (first sample, any labels) from $1/metrics.
metric() {
  python3 -c 'import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
m = re.search("^" + re.escape(sys.argv[2]) + r"(\{[^}]*\})? (\S+)$", text, re.M)
print(m.group(2) if m else "nan")' "$1" "$2"
}
for mode in colocated 1p1d; do
  {
    echo "model: $model"; echo "served_model_name: $shape"; echo "device: cuda"
    echo "max_model_len: 8448"; echo "max_num_seqs: 8"; echo "max_num_batched_tokens: 8448"
    echo "gpu_memory_utilization: 0.9"; echo "port: 0"
    if [ $mode = 1p1d ]; then
      printf 'disaggregation:\n  prefill: {replicas: 1}\n  decode: {replicas: 1}\n  provider: local\n'
    fi
  } > /tmp/disagg-$mode.yaml
  "$bin/cluster" serve /tmp/disagg-$mode.yaml --block > "$out/serve-$mode.log" 2>&1 &
  server=$!
  url=""
  for _ in $(seq 1 300); do
    url=$(grep -o "http://[0-9.]*:[0-9]*" "$out/serve-$mode.log" | head -n 1)
    [ -n "$url" ] && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if [ -z "$url" ]; then
    echo "$mode: server did not start:"; tail -20 "$out/serve-$mode.log"; continue
  fi
  grep -E "disaggregation|loaded in" "$out/serve-$mode.log" | head -4
  # Greedy ids of a fixed prompt, for the equality check.
  python3 -c 'import json, sys, urllib.request
body = {"model": sys.argv[2], "prompt": list(range(100, 613)), "max_tokens": 32, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True}
req = urllib.request.Request(sys.argv[1] + "/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["token_ids"])' \
    "$url" "$shape" > "$out/greedy-$mode.txt"
  for len in $lens; do
    "$bin/serve_bench" --base-url "$url" --endpoint /v1/completions --model "$shape" --tokenizer "$model" \
      --dataset-name random --random-input-len $len --random-output-len $out_len --ignore-eos \
      --num-prompts $n --max-concurrency 1 --seed 1 --result-file "$out/disagg-$mode-$len.json" \
      > "$out/serve_bench-$mode-$len.log" 2>&1
    echo "$mode in=$len: $(grep -E 'Mean TTFT|Median TTFT' "$out/serve_bench-$mode-$len.log" | tr -s ' ' | tr '\n' ';')"
  done
  if [ $mode = 1p1d ]; then
    bytes=$(metric "$url" troupe_kv_transfer_bytes_total)
    secs=$(metric "$url" troupe_kv_transfer_seconds_sum)
    count=$(metric "$url" troupe_kv_transfer_seconds_count)
    echo "1p1d transfers: $count, bytes $bytes, seconds $secs" | tee "$out/transfer.txt"
    python3 -c "print(f'1p1d handoff: {$bytes/$secs/1e9:.1f} GB/s over {int($count)} transfers')" | tee -a "$out/transfer.txt"
  fi
  kill $server; wait $server 2>/dev/null
done
if cmp -s "$out/greedy-colocated.txt" "$out/greedy-1p1d.txt"; then
  echo "greedy ids: 1p1d == colocated ($(head -c 80 "$out/greedy-1p1d.txt")...)"
else
  echo "greedy ids DIFFER:"; cat "$out/greedy-colocated.txt" "$out/greedy-1p1d.txt"
fi
