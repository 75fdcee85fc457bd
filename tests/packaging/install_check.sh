#!/usr/bin/env bash
# `cmake --install` into a temporary prefix: the installed cluster runs, the systemd units, the
# examples (Grafana dashboard, LeaderWorkerSet manifest) and the README are in place, and the
# manifest and the dashboard parse. Usage: install_check.sh BUILD_DIR
set -euo pipefail
build="$1"
prefix="$(mktemp -d)"
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
"$prefix/bin/cluster" --version
for f in lib/systemd/system/troupe-head.service lib/systemd/system/troupe-node.service \
         'lib/systemd/system/troupe-serve@.service' share/troupe/examples/troupe-dashboard.json \
         share/troupe/examples/k8s/leaderworkerset.yaml share/troupe/examples/tiny-qwen3.yaml \
         share/doc/troupe/README.md; do
  [ -f "$prefix/$f" ] || { echo "FAIL: $f not installed"; exit 1; }
done
grep -q '^ExecStart=/usr/local/bin/cluster start --head --block' \
  "$prefix/lib/systemd/system/troupe-head.service"
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' \
  "$prefix/share/troupe/examples/troupe-dashboard.json"
if python3 -c 'import yaml' 2>/dev/null; then
  python3 - "$prefix/share/troupe/examples/k8s/leaderworkerset.yaml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
leader = lws["leaderTemplate"]["spec"]["containers"][0]["args"][0]
worker = lws["workerTemplate"]["spec"]["containers"][0]["args"][0]
assert "cluster start --head --block" in leader and "cluster serve" in leader, leader
assert 'cluster join "$LWS_LEADER_ADDRESS:6380" --block' in worker, worker
PY
fi
echo "PASS: installed into $prefix"
