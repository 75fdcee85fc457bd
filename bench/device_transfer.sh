#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool): the GPU KV transfer bench (kv_transfer_gpu_bench: the
# Qwen3-8B KV shape staged through page-locked host memory, as serving moves GPU KV over tcp or
# sockets) for each provider, against the pinned copy bandwidth of the same run.
# Usage (from this machine): scripts/bundle.sh kv_transfer_gpu_bench, then through the device tool
#   bench/device_transfer.sh (carry dist/troupe). Output also in $OUT/gpu_transfer.log.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for lib in libcudart.so.13 libcublasLt.so.13 libnccl.so.2; do # what the CUDA plugin links
  dir=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
  [ -n "$dir" ] || dir=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
  [ -n "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
for provider in tcp socket; do
  timeout 120 dist/troupe/bin/kv_transfer_gpu_bench "$provider" 2>&1 | grep -v '^\[' |
    tee -a "$out/gpu_transfer.log"
done
