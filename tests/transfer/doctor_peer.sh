#!/usr/bin/env bash
# `cluster doctor --serve` in one process and `cluster doctor --peer` in another on loopback: every
# offered transport (socket, and libfabric tcp) is measured through the peer's echo.
# Usage: doctor_peer.sh PATH/TO/cluster
set -euo pipefail
cluster=$1
out=$(mktemp)
"$cluster" doctor --serve --bytes 4194304 > "$out" 2> /dev/null &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q "^serving" "$out" && break; sleep 0.1; done
addr=$(grep -o "doctor --peer [0-9.:]*" "$out" | cut -d' ' -f3)
[ -n "$addr" ] || { echo "FAIL: the server printed no address: $(cat "$out")"; exit 1; }
report=$(timeout 60 "$cluster" doctor --peer "$addr" --bytes 4194304 --rounds 4 2> /dev/null)
echo "$report"
grep -Eq "^  socket +[0-9.]+ GB/s" <<<"$report" || { echo "FAIL: no socket measurement"; exit 1; }
grep -Eq "^  tcp +[0-9.]+ GB/s" <<<"$report" || { echo "FAIL: no libfabric tcp measurement"; exit 1; }
