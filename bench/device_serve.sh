#!/usr/bin/env bash
# Serving benchmark on the lent GPU machine: a random-weight Qwen3 model of a real shape (written
# by bench/make_random_qwen3.py with the real Qwen3 tokenizer) served by `cluster serve --block`
# on the GPU, measured over HTTP by bench/serve_bench (random 512 in / 128 out, ignore_eos, at
# concurrency 1 and 64; IN, OUT_LEN, CONC="1 64 256" and MAX_SEQS override; GRAMMAR=1 repeats
# each concurrency with a JSON-schema response_format, for the per-token cost of structured
# output; ROUNDS=2 runs every concurrency twice, the second round warm: CUDA graphs captured and
# GEMMs tuned for the batch sizes the first one met). The engine's own
# decode step time at the same batch sizes comes from cuda_bench in the same run
# (bench/device_run.sh bench, or ENGINE=1 here). Logs and JSON results go to $OUT.
# Usage: bench/device_serve.sh [qwen3-8b|qwen3-0.6b]   (TROUPE_BUNDLE: the bundle, dist/troupe;
# CLUSTER: another binary in its bin/ to serve with, e.g. a baseline build side by side)
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
in_len=${IN:-512}
out_len=${OUT_LEN:-128}
conc=${CONC:-1 64}
max_seqs=${MAX_SEQS:-64}
model=/tmp/troupe-$shape
[ -f "$model/config.json" ] || python3 "$here/make_random_qwen3.py" "$shape" "$model" dist/golden/tokenizers/qwen3 \
  2>&1 | grep -v Warning | tail -2
if [ -n "${ENGINE:-}" ]; then # the engine's decode step at the same batch sizes, mean context
  "$bin/cuda_bench" --shape "$shape" --batches "${conc// /,}" --ctx $(( in_len + out_len / 2 )) \
    --no-prefill 2>&1 | tee "$out/cuda_bench-$shape.log" | tail -8
fi
cat > /tmp/serve-$shape.yaml <<YAML
model: $model
served_model_name: $shape
device: cuda
max_model_len: 2048
max_num_seqs: $max_seqs
max_num_batched_tokens: 8192
gpu_memory_utilization: 0.85
port: 0
YAML
"$bin/${CLUSTER:-cluster}" serve /tmp/serve-$shape.yaml --block > "$out/serve-$shape.log" 2>&1 &
server=$!
url=""
for _ in $(seq 1 300); do
  url=$(grep -o "http://[0-9.]*:[0-9]*" "$out/serve-$shape.log" | head -n 1)
  [ -n "$url" ] && break
  kill -0 $server 2>/dev/null || break
  sleep 1
done
if [ -z "$url" ]; then
  echo "server did not start:"; tail -20 "$out/serve-$shape.log"; exit 1
fi
echo "serving $shape at $url"
schema='{"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema":
  {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}}'
for round in $(seq 1 "${ROUNDS:-1}"); do
  for c in $conc; do
    n=$(( c == 1 ? 8 : 2 * c ))
    for variant in plain ${GRAMMAR:+json}; do
      extra='{}'; [ "$variant" = json ] && extra=$schema
      tag=$shape-c$c-$variant; [ "${ROUNDS:-1}" -gt 1 ] && tag=$tag-r$round
      echo "== round $round, concurrency $c, $variant"
      "$bin/serve_bench" --base-url "$url" --endpoint /v1/completions --model "$shape" --tokenizer "$model" \
        --dataset-name random --random-input-len $in_len --random-output-len $out_len --ignore-eos \
        --num-prompts $n --max-concurrency $c --seed 1 --extra-body "$extra" \
        --result-file "$out/serve-$tag.json" \
        2>&1 | tee "$out/serve_bench-$tag.log" | tail -25
    done
  done
done
kill $server; wait $server 2>/dev/null
