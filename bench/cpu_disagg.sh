#!/usr/bin/env bash
# Prefill/decode disaggregation on CPU ranks against colocated replicas at the same device count.
# NODES node daemons on this machine (default 2: the head's own node and joined ones), each one
# CPU device with THREADS threads, serve one model once per layout in MODES (default "colocated
# 1p1d"):
#   colocated: NODES replicas, one per node; each interleaves prefill chunks with its decodes;
#   XpYd:      X prefill and Y decode replicas (X + Y = NODES), the KV moved between the node
#              processes by the transfer layer (PROVIDER, default tcp: libfabric's tcp provider).
# serve_bench sends the same mixed workload to both: N requests at RATE requests/s (Poisson),
# IN prompt tokens (+- RANGE) and OUT_LEN output tokens, ignore_eos. It reports ITL p99 and the
# goodput: requests/s meeting TTFT <= SLO_TTFT_MS and TPOT <= SLO_TPOT_MS (vllm bench serve's
# --goodput). Logs and result JSON go to $OUT.
# Usage: [NODES=3 MODES="colocated 2p1d"] bench/cpu_disagg.sh MODEL TOKENIZER
#   MODEL: a Hugging Face folder or .gguf; TOKENIZER: the folder or .gguf serve_bench encodes with.
#   TROUPE_BUNDLE (default dist/troupe) holds bin/cluster and bin/serve_bench.
set -uo pipefail
model=$(realpath "$1")
tokenizer=$(realpath "$2")
out=${OUT:-/tmp/cpu_disagg}
bin=$(realpath "${TROUPE_BUNDLE:-dist/troupe}/bin")
nodes=${NODES:-2}
modes=${MODES:-colocated 1p1d}
threads=${THREADS:-$(( $(nproc) / nodes ))}
in_len=${IN:-1024}
range=${RANGE:-0.5}
out_len=${OUT_LEN:-128}
n=${N:-48}
rate=${RATE:-1}
provider=${PROVIDER:-tcp}
slo_ttft=${SLO_TTFT_MS:-2000}
slo_tpot=${SLO_TPOT_MS:-100}
max_len=$(( in_len * 2 + out_len + 64 ))
mkdir -p "$out"
work=$(mktemp -d)
export TROUPE_TEMP_DIR="$work/head"
stop_all() {
  for k in $(seq 1 $(( nodes - 1 ))); do
    TROUPE_TEMP_DIR="$work/node$k" "$bin/cluster" stop >/dev/null 2>&1
  done
  "$bin/cluster" stop >/dev/null 2>&1
  rm -rf "$work"
}
trap stop_all EXIT
TROUPE_CPU_THREADS=$threads "$bin/cluster" start --head --port 0 --num-gpus 1 > "$out/head.txt" 2>&1 ||
  { cat "$out/head.txt"; exit 1; }
join=$(grep -o 'cluster join .*' "$out/head.txt" | head -n 1 | sed 's/^cluster //')
[ -n "$join" ] || { echo "no join command in:"; cat "$out/head.txt"; exit 1; }
for k in $(seq 1 $(( nodes - 1 ))); do
  # shellcheck disable=SC2086 # the join command's words
  TROUPE_TEMP_DIR="$work/node$k" TROUPE_CPU_THREADS=$threads "$bin/cluster" $join --num-gpus 1 \
    > "$out/node$k.txt" 2>&1 || { cat "$out/node$k.txt"; exit 1; }
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $nodes nodes x $threads threads"
for mode in $modes; do
  {
    echo "model: $model"; echo "served_model_name: bench"; echo "device: cpu"
    echo "max_model_len: $max_len"; echo "max_num_seqs: 32"; echo "max_num_batched_tokens: 2048"
    echo "port: 0"
    if [ "$mode" = colocated ]; then
      echo "parallel: {replicas: $nodes}"
    else # XpYd
      p=${mode%%p*} d=${mode#*p}
      d=${d%d}
      printf 'disaggregation:\n  prefill: {replicas: %s}\n  decode: {replicas: %s}\n  provider: %s\n' \
        "$p" "$d" "$provider"
    fi
  } > "$work/$mode.yaml"
  if ! "$bin/cluster" serve "$work/$mode.yaml" > "$out/serve-$mode.txt" 2>&1; then
    echo "$mode: serve failed:"; tail -5 "$out/serve-$mode.txt"; continue
  fi
  url=$(grep -o 'http://[0-9.]*:[0-9]*' "$out/serve-$mode.txt" | head -n 1)
  "$bin/cluster" status > "$out/status-$mode.txt" 2>&1
  "$bin/serve_bench" --base-url "$url" --endpoint /v1/completions --model bench \
    --tokenizer "$tokenizer" --dataset-name random --random-input-len "$in_len" \
    --random-range-ratio "$range" --random-output-len "$out_len" --ignore-eos \
    --num-prompts "$n" --request-rate "$rate" --seed 1 \
    --goodput "ttft:$slo_ttft" "tpot:$slo_tpot" \
    --result-file "$out/cpu_disagg-$mode.json" > "$out/serve_bench-$mode.log" 2>&1
  echo "$mode: $(grep -E 'Request throughput|goodput|Median TTFT|P99 TTFT|Median ITL|P99 ITL|Median TPOT' \
    "$out/serve_bench-$mode.log" | tr -s ' ' | tr '\n' ';')"
  "$bin/cluster" serve --stop bench > /dev/null 2>&1
done
