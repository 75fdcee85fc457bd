#!/usr/bin/env bash
# `cluster doctor --serve` in one process and `cluster doctor --peer` in another on loopback: every
# offered transport (socket, and libfabric tcp) is measured through the peer's echo.
# Usage: doctor_peer.sh PATH/TO/cluster
set -euo pipefail
cluster=$1
out=$(mktemp)
server_log=$(mktemp)
peer_log=$(mktemp)
"$cluster" doctor --serve --bytes 4194304 > "$out" 2> "$server_log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$out" "$server_log" "$peer_log"' EXIT
# On a failure: what both sides logged.
logs() { echo "--- server:"; cat "$server_log"; echo "--- peer:"; cat "$peer_log"; }
for _ in $(seq 100); do grep -q "^serving" "$out" && break; sleep 0.1; done
addr=$(grep -o "doctor --peer [0-9.:]*" "$out" | cut -d' ' -f3)
[ -n "$addr" ] || { echo "FAIL: the server printed no address: $(cat "$out")"; logs; exit 1; }
status=0
report=$(timeout 60 "$cluster" doctor --peer "$addr" --bytes 4194304 --rounds 4 2> "$peer_log") ||
  status=$?
echo "$report"
[ "$status" -eq 0 ] || { echo "FAIL: doctor --peer exited $status"; logs; exit 1; }
grep -Eq "^  socket +[0-9.]+ GB/s" <<<"$report" || { echo "FAIL: no socket measurement"; logs; exit 1; }
grep -Eq "^  tcp +[0-9.]+ GB/s" <<<"$report" || { echo "FAIL: no libfabric tcp measurement"; logs; exit 1; }
