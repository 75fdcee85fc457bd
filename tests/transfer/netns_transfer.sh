#!/usr/bin/env bash
# The fabric transport (tcp provider) and the socket transport, each between two network namespaces
# joined by a veth pair: 1) an impaired link (tc netem delay 5 ms + loss 1% where the kernel has
# sch_netem, else tbf at 200 Mbit/s, said in the output): a 2 × 16 MiB batch arrives intact; 2) the
# link cut mid transfer (veth down): the initiator's error comes within its deadline and the
# target's within its own, no process hangs.
# Needs root (ip netns); exits 77 with the reason where namespaces cannot be made (as the
# integration tests' namespace case does: a container may forbid them).
# Usage: netns_transfer.sh PATH/TO/transfer_peer
set -euo pipefail
peer=$1
ns_a=troupe_xfer_a_$$
ns_b=troupe_xfer_b_$$
skip() {
  echo "SKIP: $*"; exit 77
}

[ "$(id -u)" -eq 0 ] || skip "needs root for ip netns"
command -v ip >/dev/null || skip "iproute2 (ip) not installed"
command -v tc >/dev/null || skip "tc not installed"
ip netns add "$ns_a" 2>/dev/null || skip "ip netns add not permitted here"
cleanup() {
  jobs -p | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns_b"
ip link add veth_a_$$ netns "$ns_a" type veth peer name veth_b_$$ netns "$ns_b"
ip -n "$ns_a" addr add 10.77.0.1/24 dev veth_a_$$
ip -n "$ns_b" addr add 10.77.0.2/24 dev veth_b_$$
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set veth_a_$$ up
ip -n "$ns_b" link set veth_b_$$ up
if tc -n "$ns_a" qdisc add dev veth_a_$$ root netem delay 5ms loss 1% 2>/dev/null; then
  impair="netem delay 5ms loss 1%"
else
  impair="tbf rate 200mbit burst 64kb latency 50ms"
  echo "NOTE: tc netem unavailable here (no sch_netem in this kernel): the impaired-link case runs with $impair"
  tc -n "$ns_a" qdisc add dev veth_a_$$ root $impair
fi

fail() { echo "FAIL: $*"; exit 1; }
now_ms() { date +%s%3N; }

# Starts a target in ns b; sets ADDR and DESC from its first two lines.
start_target() {
  exec {tfd}< <(TRANSFER_HOST=10.77.0.2 TRANSFER_NOTICE_MS=$2 ip netns exec "$ns_b" "$peer" target "$1" 5)
  read -r -t 10 line <&$tfd || fail "target did not start"
  ADDR=${line#ADDR }
  read -r -t 5 line <&$tfd || fail "target printed no descriptor"
  DESC=${line#DESC }
}

run_kind() {
export TRANSFER_KIND=$1
ip -n "$ns_a" link set veth_a_$$ up
echo "== $1: $impair: 2 x 16 MiB"
start_target $((16 << 20)) 20000
out=$(TRANSFER_HOST=10.77.0.1 TRANSFER_DEADLINE_MS=20000 timeout 30 \
      ip netns exec "$ns_a" "$peer" initiator "$ADDR" "$DESC" $((16 << 20)) 2 5) || fail "initiator: $out"
echo "$out"
grep -q "^DONE $((32 << 20)) " <<<"$out" || fail "initiator did not finish"
read -r -t 10 notice <&$tfd || fail "target printed no notice"
read -r -t 5 check <&$tfd || fail "target printed no check"
echo "target: $notice / $check"
[ "$check" = "CHECK ok" ] || fail "data arrived corrupted"
exec {tfd}<&-

echo "== $1: link cut mid transfer (initiator deadline 2 s, target notice deadline 3 s)"
start_target $((64 << 20)) 3000
( TRANSFER_HOST=10.77.0.1 TRANSFER_DEADLINE_MS=2000 timeout 20 \
    ip netns exec "$ns_a" "$peer" initiator "$ADDR" "$DESC" $((64 << 20)) 100 5 > /tmp/netns_xfer_$$.out ) &
init_pid=$!
for _ in $(seq 100); do grep -q POSTED /tmp/netns_xfer_$$.out 2>/dev/null && break; sleep 0.1; done
grep -q POSTED /tmp/netns_xfer_$$.out || fail "initiator did not start writing: $(cat /tmp/netns_xfer_$$.out)"
sleep 0.2
t0=$(now_ms)
ip -n "$ns_a" link set veth_a_$$ down
wait $init_pid || true
t1=$(now_ms)
out=$(cat /tmp/netns_xfer_$$.out); rm -f /tmp/netns_xfer_$$.out
echo "$out"
grep -q "^ERROR timeout" <<<"$out" || fail "initiator did not report the deadline"
(( t1 - t0 < 4000 )) || fail "initiator took $((t1 - t0)) ms (deadline 2000 ms)"
read -r -t 10 line <&$tfd || fail "target printed nothing within its deadline"
t2=$(now_ms)
echo "target: $line"
grep -q "^ERROR" <<<"$line" || fail "target did not report the loss"
(( t2 - t0 < 6000 )) || fail "target took $((t2 - t0)) ms (deadline 3000 ms)"
exec {tfd}<&-
echo "PASS $1: initiator error after $((t1 - t0)) ms, target after $((t2 - t0)) ms"
}

run_kind fabric
run_kind socket
