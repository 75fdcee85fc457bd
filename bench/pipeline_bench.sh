#!/usr/bin/env bash
# Pipeline micro-batching on CPU ranks: one model served through a head by `cluster serve`, first
# pipeline=1 (one node), then pipeline=2 (two nodes, one stage each), every node limited to
# THREADS compute threads, and the same serve_bench load (random IN in / OUT out, ignore_eos,
# concurrency C) against each. With both stages busy on different plans, pipeline=2 has twice
# the compute: efficiency = throughput(pipeline=2) / (2 x throughput(pipeline=1)); stages that
# took turns would give about 0.5. The last stage also holds the final norm and lm_head, which
# bounds efficiency below 1.
# Prefill chunks are 512 tokens (max_num_batched_tokens), so no CPU step runs for long.
# Usage: bench/pipeline_bench.sh MODEL_DIR [THREADS] [C]
#   BIN: folder with cluster and serve_bench (default build/release/{cli,bench}); OUT: logs.
set -euo pipefail
model=$1
threads=${2:-4}
conc=${3:-16}
in=${IN:-128}
outlen=${OUT_LEN:-64}
out=${OUT:-/tmp/troupe-pipeline-bench}
mkdir -p "$out"
if [ -n "${BIN:-}" ]; then cluster="$BIN/cluster" bench="$BIN/serve_bench"
else cluster=build/release/cli/cluster bench=build/release/bench/serve_bench; fi
work=$(mktemp -d)
token=bench-$$
port=$((20000 + $$ % 20000))
export TROUPE_CPU_THREADS=$threads
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$cluster" start --head --block --port $port --token $token --num-gpus 0 --temp-dir "$work/head" \
  > "$out/head.log" 2>&1 & pids+=($!)
sleep 1
for n in a b; do
  "$cluster" join 127.0.0.1:$port --block --token $token --num-gpus 1 --temp-dir "$work/$n" \
    > "$out/node-$n.log" 2>&1 & pids+=($!)
done
for _ in $(seq 1 60); do
  alive=$("$cluster" status --json --address 127.0.0.1:$port --token $token --timeout 2 2>/dev/null |
    python3 -c 'import json,sys; print(sum(n["state"]=="alive" for n in json.load(sys.stdin)["nodes"]))' || echo 0)
  [ "$alive" = 3 ] && break
  sleep 1
done
run() { # pipeline
  local pp=$1 name=bench-pp$1
  printf 'model: %s\nserved_model_name: %s\nmax_model_len: 1024\nmax_num_seqs: %s\nmax_num_batched_tokens: 512\nnum_kv_blocks: 512\nport: 0\nparallel: {pipeline: %s}\n' \
    "$model" "$name" "$conc" "$pp" > "$work/$name.yaml"
  local served url
  served=$("$cluster" serve "$work/$name.yaml" --address 127.0.0.1:$port --token $token)
  url=$(grep -o 'http://[^ ]*/v1' <<< "$served" | head -1 | sed 's|/v1$||')
  "$bench" --base-url "$url" --endpoint /v1/completions --model "$name" --tokenizer "$model" \
    --dataset-name random --random-input-len $in --random-output-len $outlen --ignore-eos \
    --num-prompts $((conc * 2)) --max-concurrency $conc --seed 1 \
    --result-file "$out/$name.json" > "$out/$name.log" 2>&1
  tail -22 "$out/$name.log"
  "$cluster" serve --stop "$name" --address 127.0.0.1:$port --token $token > /dev/null
}
run 1
run 2
python3 - "$out" "$threads" "$conc" <<'PY'
import json, sys
out, threads, conc = sys.argv[1], sys.argv[2], sys.argv[3]
r = {pp: json.load(open(f"{out}/bench-pp{pp}.json")) for pp in (1, 2)}
t1, t2 = r[1]["output_throughput"], r[2]["output_throughput"]
print(f"threads per node {threads}, concurrency {conc}")
print(f"pipeline=1: {t1:.1f} output tok/s, median TPOT {r[1]['median_tpot_ms']:.1f} ms")
print(f"pipeline=2: {t2:.1f} output tok/s, median TPOT {r[2]['median_tpot_ms']:.1f} ms")
print(f"pipeline efficiency = {t2:.1f} / (2 x {t1:.1f}) = {t2 / (2 * t1):.2f}")
PY
