#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool): the GPU KV transfer bench (kv_transfer_gpu_bench, built
# here with CUDA and carried in dist/xfer with libfmt) against the PCIe copy bandwidth of the same run.
# Usage (from this machine): cmake --build build/release --target kv_transfer_gpu_bench &&
#   mkdir -p dist/xfer && cp build/release/bench/kv_transfer_gpu_bench /lib/x86_64-linux-gnu/libfmt.so.9 dist/xfer/
#   then the device tool: bench/device_transfer.sh (carry dist/xfer). Output also in $OUT/gpu_transfer.log.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
dir=$(ldconfig -p | awk '$1 == "libcudart.so.13" {print $NF; exit}' | xargs -r dirname)
[ -n "$dir" ] || dir=$(find / -xdev -name libcudart.so.13 -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
export LD_LIBRARY_PATH="$PWD/dist/xfer:${dir:-}:${LD_LIBRARY_PATH:-}"
for i in 1 2 3; do
  timeout 120 dist/xfer/kv_transfer_gpu_bench 2>&1 | tee -a "$out/gpu_transfer.log"
done
