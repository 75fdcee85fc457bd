#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool) over a bundle made by scripts/bundle.sh, with the
# golden models copied to dist/golden: GPU tests, compute-sanitizer, then the CUDA benchmark and
# the Hugging Face reference. Logs go to $OUT. TROUPE_BUNDLE names the bundle (dist/troupe).
# Usage: bench/device_run.sh [tests|sanitize|bench|hf|all] [cuda_bench args...]
set -uo pipefail
mode=${1:-all}
shift || true
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
# The device's CUDA 13 runtime, cuBLASLt and NCCL: wherever its image keeps them.
for lib in libcudart.so.13 libcublasLt.so.13 libnccl.so.2; do
  dir=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
  [ -n "$dir" ] || dir=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
  [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export TROUPE_GOLDEN_DIR=$PWD/dist/golden CI=true
bin=${TROUPE_BUNDLE:-dist/troupe}/bin
summary='MESSAGE|ERROR|relative|test cases|assertions|Status|SUMMARY'
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  "$bin/gpu_tests" 2>&1 | tee "$out/gpu_tests.log" | grep -E "$summary" | head -80
fi
if [ "$mode" = sanitize ] || [ "$mode" = all ]; then
  # memcheck over the kernel tests and one golden model; racecheck over the attention kernels.
  compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/gpu_tests" \
    -tc='*paged attention*,*gemm*,*norms*,*tiny-qwen3' 2>&1 | tee "$out/memcheck.log" | grep -E "$summary" | tail -5
  compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/gpu_tests" -tc='*paged attention*' \
    2>&1 | tee "$out/racecheck.log" | grep -E "$summary|hazard" | tail -5
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  "$bin/cuda_bench" "$@" 2>&1 | tee "$out/cuda_bench.log"
fi
if [ "$mode" = hf ] || [ "$mode" = all ]; then
  python3 bench/hf_decode.py "$@" 2>&1 | tee "$out/hf_decode.log" | tail -5
fi
