#!/usr/bin/env bash
# Issue 22 in one call on the lent GPU machine, over a bundle made by scripts/bundle.sh (bin/,
# lib/, golden/, and optionally old/bin with the binaries of the commit before, for same-card
# before/after): GPU tests and compute-sanitizer memcheck of the new kernels, the cold start of a
# random-weight Qwen3-8B (bench/make_random_qwen3.py) through `cluster serve --block`
# (bench/coldstart.py), and batch-1 decode of both shapes with each change on and off.
# Steps run in the order given. Logs go to $OUT. Run from the repository root (bench/make_random_qwen3.py, tests/serve); the
# bundle holds coldstart.py. Usage: bench/device_decode.sh BUNDLE [steps: tests,sanitize,cold,decode]
set -uo pipefail
B=${1:-dist/troupe}
steps=${2:-tests,sanitize,cold,decode}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
for lib in libcudart.so.13 libcublasLt.so.13 libnccl.so.2; do
  dir=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
  [ -n "$dir" ] || dir=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
  [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
export TROUPE_GOLDEN_DIR=$PWD/$B/golden CI=true
summary='MESSAGE|ERROR|relative|test cases|assertions|Status|SUMMARY|FAIL'
run_tests() {
  echo "== gpu_tests"
  timeout 300 "$B/bin/gpu_tests" 2>&1 | tee "$out/gpu_tests.log" | grep -E "$summary" | tail -12
  timeout 120 python3 tests/serve/serve_cuda_e2e.py "$B/bin/cluster" "$TROUPE_GOLDEN_DIR" \
    > "$out/serve_cuda_e2e.log" 2>&1
  echo "serve_cuda_e2e: exit $? ($(tail -n 1 "$out/serve_cuda_e2e.log"))"
}
run_sanitize() {
  echo "== memcheck"
  timeout 400 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/bin/gpu_tests" \
    -tc='*weight loader*,*skinny*,*norms*,*tiny-qwen3,*tiny-llama' 2>&1 |
    tee "$out/memcheck.log" | grep -E "$summary" | tail -5
}
run_cold() {
  echo "== cold start, Qwen3-8B shape"
  model=/tmp/troupe-qwen3-8b
  t0=$(date +%s.%N)
  [ -f "$model/config.json" ] || python3 bench/make_random_qwen3.py qwen3-8b "$model" \
    "$B/golden/tokenizers/qwen3" 2>&1 | grep -v -i warn | tail -2
  echo "model ready after $(awk "BEGIN{print $(date +%s.%N) - $t0}") s: $(du -sh $model | cut -f1)"
  cat "$model"/*.safetensors > /dev/null # in the page cache, as the goal says
  timeout 120 python3 "$B/coldstart.py" "$B/bin/cluster" "$model" qwen3-8b "$out/serve_new.log"
  grep -h "device: cuda" "$out/serve_new.log" | tail -2
  if [ -x "$B/old/bin/cluster" ]; then
    timeout 150 python3 "$B/coldstart.py" "$B/old/bin/cluster" "$model" qwen3-8b "$out/serve_old.log"
  fi
}
run_decode() {
  echo "== decode, batch 1 (and 8), ctx 512 and 4096"
  args="--shape qwen3-0.6b --shape qwen3-8b --batches 1,8 --ctx 512,4096 --no-prefill"
  "$B/bin/cuda_bench" $args 2>&1 | tee "$out/decode_new.log" | grep -v "^$"
  echo "-- without the fused gate/up+silu kernel and the L2 prefetch (early launch stays)"
  TROUPE_SKINNY_GLU=0 TROUPE_SKINNY_PREFETCH_MB=0 "$B/bin/cuda_bench" --shape qwen3-0.6b \
    --shape qwen3-8b --batches 1 --ctx 512 --no-prefill 2>&1 | tee "$out/decode_off.log" | grep "^| 1 "
  echo "-- fused kernel on, prefetch off"
  TROUPE_SKINNY_PREFETCH_MB=0 "$B/bin/cuda_bench" --shape qwen3-0.6b --shape qwen3-8b --batches 1 \
    --ctx 512 --no-prefill 2>&1 | grep "^| 1 "
  if [ -x "$B/old/bin/cuda_bench" ]; then
    echo "-- the commit before (same card)"
    "$B/old/bin/cuda_bench" $args 2>&1 | tee "$out/decode_old.log" | grep -v "^$"
  fi
}
for step in ${steps//,/ }; do # in the order given
  "run_$step"
done
