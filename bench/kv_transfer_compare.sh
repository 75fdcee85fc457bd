#!/usr/bin/env bash
# kv_transfer_bench (raw TCP, fabric tcp, socket transport) and, right after on the same loopback,
# Mooncake's transfer engine over its TCP transport (PyPI mooncake-transfer-engine-non-cuda, the
# transfer_engine_bench it ships) for the KV layer shape (128 × 64 KiB per batch) and 64 MiB blocks.
# Usage: bench/kv_transfer_compare.sh [build/release] [path/to/mooncake/transfer_engine_bench]
set -euo pipefail
build=${1:-build/release}
mc=${2:-}
"$build/bench/kv_transfer_bench" 2> /dev/null
[ -n "$mc" ] || { echo "mooncake: no transfer_engine_bench given, skipped"; exit 0; }
log=$(mktemp)
trap 'kill $target 2>/dev/null || true; rm -f "$log"' EXIT
"$mc" --mode=target --metadata_server=P2PHANDSHAKE --local_server_name=127.0.0.1:17777 \
  --protocol=tcp --buffer_size=1073741824 > "$log" 2>&1 &
target=$!
for _ in $(seq 50); do grep -q "listening on" "$log" && break; sleep 0.2; done
port=$(grep -o "listening on 127.0.0.1:[0-9]*" "$log" | head -1 | cut -d: -f2)
echo
echo "Mooncake transfer engine, TCP transport, write, 1 submitting thread, 5 s each:"
for shape in "65536 128" "67108864 1"; do
  set -- $shape
  r=$("$mc" --mode=initiator --metadata_server=P2PHANDSHAKE --local_server_name=127.0.0.1:17778 \
        --segment_id=127.0.0.1:$port --protocol=tcp --operation=write --block_size=$1 \
        --batch_size=$2 --threads=1 --duration=5 --buffer_size=1073741824 2>&1 |
      grep -o "throughput [0-9.]* GB/s" || echo "failed")
  echo "  block $1 B x batch $2: $r"
done
