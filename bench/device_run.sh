#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool) over a bundle made by scripts/bundle.sh, with the
# golden models copied to dist/golden: GPU tests, compute-sanitizer, then the CUDA benchmark and
# the Hugging Face reference. Logs go to $OUT. TROUPE_BUNDLE names the bundle (dist/troupe).
# tests = gpu_tests, gpu_parallel_tests and the HTTP end-to-end scripts on the GPU.
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
  [ -x "$bin/gpu_parallel_tests" ] && "$bin/gpu_parallel_tests" 2>&1 | tee "$out/gpu_parallel_tests.log" |
    grep -E "$summary" | head -40
  # HTTP end to end on the GPU: in this process (--block), and through a head and its worker actor.
  for t in serve_cuda_e2e cluster_cuda_e2e; do
    timeout 300 python3 tests/serve/$t.py "$bin/cluster" "$TROUPE_GOLDEN_DIR" > "$out/$t.log" 2>&1
    echo "$t: exit $? ($(tail -n 1 "$out/$t.log"))"
  done
fi
if [ "$mode" = sanitize ] || [ "$mode" = all ]; then
  # memcheck over the kernel tests, the GPU sampler and one golden model; racecheck over the
  # attention kernels and the sampler (both share memory between threads).
  compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/gpu_tests" \
    -tc='*paged attention*,*gemm*,*norms*,*tiny-qwen3,*tiny-llama,*gpu sampler*,*weight loader*' 2>&1 | tee "$out/memcheck.log" | grep -E "$summary" | tail -5
  compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/gpu_tests" -tc='*paged attention*,*gpu sampler*' \
    2>&1 | tee "$out/racecheck.log" | grep -E "$summary|hazard" | tail -5
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  "$bin/cuda_bench" "$@" 2>&1 | tee "$out/cuda_bench.log"
fi
if [ "$mode" = hf ] || [ "$mode" = all ]; then
  python3 bench/hf_decode.py "$@" 2>&1 | tee "$out/hf_decode.log" | tail -5
fi
