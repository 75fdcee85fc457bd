#!/usr/bin/env bash
# Issue 22 in one call on the lent GPU machine, over a bundle made by scripts/bundle.sh (bin/,
# lib/, golden/ with models, expected and tokenizers (the tiny models link to them), and
# optionally old/bin with the binaries of the commit before, for same-card before/after): GPU
# tests and compute-sanitizer memcheck of the new kernels, the cold start of a random-weight
# Qwen3-8B (bench/make_random_qwen3.py) through `cluster serve --block`
# (bench/coldstart.py), and batch-1 decode of both shapes with each change on and off.
# Steps run in the order given. Logs go to $OUT. Run from the repository root
# (bench/make_random_qwen3.py, tests/serve); the bundle holds coldstart.py.
# Usage: bench/device_decode.sh BUNDLE [steps: tests,parallel,sanitize,cold,decode,disk,profile]
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
  timeout 300 "$B/bin/gpu_tests" ${GPU_TESTS_FILTER:+-tc="$GPU_TESTS_FILTER"} 2>&1 |
    tee "$out/gpu_tests.log" | grep -E "$summary" | tail -12
  timeout 120 python3 tests/serve/serve_cuda_e2e.py "$B/bin/cluster" "$TROUPE_GOLDEN_DIR" \
    > "$out/serve_cuda_e2e.log" 2>&1
  echo "serve_cuda_e2e: exit $? ($(tail -n 1 "$out/serve_cuda_e2e.log"))"
}
run_parallel() { # sharded loads (row and column slices) on one GPU, and serving through a worker
  echo "== gpu_parallel_tests, cluster_cuda_e2e"
  timeout 300 "$B/bin/gpu_parallel_tests" 2>&1 | tee "$out/gpu_parallel_tests.log" |
    grep -E "$summary" | tail -6
  timeout 180 python3 tests/serve/cluster_cuda_e2e.py "$B/bin/cluster" "$TROUPE_GOLDEN_DIR" \
    > "$out/cluster_cuda_e2e.log" 2>&1
  echo "cluster_cuda_e2e: exit $? ($(tail -n 1 "$out/cluster_cuda_e2e.log"))"
}
run_sanitize() {
  echo "== memcheck"
  timeout 400 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/bin/gpu_tests" \
    -tc='*weight loader*,*gemm*,*norms*,*tiny-qwen3,*tiny-llama' 2>&1 |
    tee "$out/memcheck.log" | grep -E "$summary" | tail -5
}
evict() { # drop the model's files from the page cache (posix_fadvise, these files only)
  sync
  python3 -c 'import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
}
run_cold() {
  echo "== cold start, Qwen3-8B shape"
  model=/tmp/troupe-qwen3-8b
  t0=$(date +%s.%N)
  [ -f "$model/config.json" ] || python3 bench/make_random_qwen3.py qwen3-8b "$model" \
    "$B/golden/tokenizers/qwen3" 2>&1 | grep -v -i warn | tail -1
  echo "model ready after $(awk "BEGIN{print $(date +%s.%N) - $t0}") s: $(du -sh $model | cut -f1)"
  cat "$model"/*.safetensors > /dev/null
  echo "-- page cache warm"
  timeout 120 python3 "$B/coldstart.py" "$B/bin/cluster" "$model" qwen3-8b "$out/s1.log"
  grep -h "loaded in" "$out/s1.log"
  echo "-- page cache cold (model files evicted), readahead advice off, then on"
  evict "$model"/*.safetensors
  TROUPE_LOAD_WILLNEED=0 timeout 100 python3 "$B/coldstart.py" "$B/bin/cluster" "$model" qwen3-8b "$out/s2.log"
  grep -h "loaded in" "$out/s2.log"
  evict "$model"/*.safetensors
  timeout 100 python3 "$B/coldstart.py" "$B/bin/cluster" "$model" qwen3-8b "$out/s3.log"
  grep -h "loaded in" "$out/s3.log"
  if [ -x "$B/old/bin/cluster" ]; then
    echo "-- the commit before, page cache warm"
    cat "$model"/*.safetensors > /dev/null
    LD_LIBRARY_PATH="$PWD/$B/lib:$LD_LIBRARY_PATH" timeout 150 python3 "$B/coldstart.py" \
      "$B/old/bin/cluster" "$model" qwen3-8b "$out/s4.log"
  fi
  cat "$out"/s[1-4].log > "$out/serve_all.log" 2>/dev/null
  rm -f "$out"/s[1-4].log
}
run_decode() {
  echo "== decode, batch 1 (and 8), ctx 512 and 4096"
  args=${DECODE_ARGS:-"--shape qwen3-0.6b --shape qwen3-8b --batches 1,8 --ctx 512,4096 --no-prefill"}
  "$B/bin/cuda_bench" $args 2>&1 | tee "$out/decode_new.log" | grep -v "^$"
  if [ -x "$B/old/bin/cuda_bench" ]; then
    echo "-- the commit before (same card)"
    LD_LIBRARY_PATH="$PWD/$B/lib:$LD_LIBRARY_PATH" "$B/old/bin/cuda_bench" $args 2>&1 |
      tee "$out/decode_old.log" | grep -v "^$"
  fi
}
run_disk() { # the disk's own sequential read rate, for the cold-page-cache load
  echo "== disk: 8 GiB written, evicted, read back"
  dd if=/dev/zero of=/tmp/disk_probe bs=16M count=512 conv=fdatasync 2>&1 | tail -1
  evict /tmp/disk_probe
  dd if=/tmp/disk_probe of=/dev/null bs=16M 2>&1 | tail -1
  rm -f /tmp/disk_probe
}
run_profile() { # per-kernel GPU time and DRAM bytes of an eager decode step, from ncu (kernels
  # serialised, clocks and caches left as they are); PROFILE_ARGS "batch ctx", PROFILE_SHAPES
  echo "== profile (${PROFILE_ARGS:=1 512})"
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute*/ncu 2>/dev/null | head -n 1)
  if [ -z "$ncu" ]; then
    echo "no ncu on this machine"
    return
  fi
  for shape in ${PROFILE_SHAPES:-qwen3-0.6b qwen3-8b}; do
    timeout 300 "$ncu" --csv --page raw --cache-control none --clock-control none \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size --print-units base \
      "$B/bin/cuda_bench" --shape "$shape" --profile-decode $PROFILE_ARGS \
      > "/tmp/prof-$shape.csv" 2> "/tmp/prof-$shape.err"
    tail -3 "/tmp/prof-$shape.err"
    echo "-- $shape, the last eager decode step (batch, ctx: $PROFILE_ARGS)"
    python3 "$(dirname "$0")/ncu_step.py" "/tmp/prof-$shape.csv" | tee -a "$out/profile.log"
  done
}
for step in ${steps//,/ }; do # in the order given
  "run_$step"
done
