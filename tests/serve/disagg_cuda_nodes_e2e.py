#!/usr/bin/env python3
"""Prefill/decode disaggregation between node processes on the GPU: `cluster start --head` (its
node sees this host's GPU) and `cluster join` of a second node daemon on the same host (it sees
the same GPU), then `cluster serve` of the golden tiny-qwen3 model with device: cuda, first
colocated, then twice as 1P1D:
- provider auto: both ranks on one host, so the KV goes device to device by CUDA IPC (the
  transfer text says "KV by CUDA IPC (same host)"), never staged: every prompt, the long one too,
  is handed off;
- PROVIDER (default tcp) with staging: always: the KV is staged through page-locked host memory
  on both sides; a prompt longer than the staging room is prefilled on the decode replica.
Greedy tokens of prompts sent one at a time must equal the colocated deployment's (in bf16 a
random model's near-ties make `cluster generate`, whose prefill runs other kernels, a poor
reference), concurrent ones must equal those, and no KV block stays in use. Skips (77) without a
GPU.
Usage: disagg_cuda_nodes_e2e.py PATH/TO/cluster GOLDEN_DIR [PROVIDER]."""
import json, os, re, subprocess, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_util  # noqa: E402
from serve_util import golden_model, post  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
provider = sys.argv[3] if len(sys.argv) > 3 else "tcp"
tmp = tempfile.mkdtemp(prefix="troupe-disagg-nodes-")
env = dict(os.environ, TROUPE_TEMP_DIR=os.path.join(tmp, "head"))
node_dir = os.path.join(tmp, "node")


def run(*args, timeout=300):
    return subprocess.run([cluster, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def stop_all():
    run("stop", "--temp-dir", node_dir)
    run("stop")


def fail(msg):
    for root in (os.path.join(tmp, "head"), node_dir):
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith(".log"):
                    with open(os.path.join(dirpath, name), errors="replace") as f:
                        print(f"--- {name} (last lines)\n" + "".join(f.readlines()[-40:]))
    serve_util.fail(msg, stop_all)


prompts = [[11 + (k * 37 + i * 101) % 900 for k in range(9 + 13 * i)] for i in range(5)]
long_prompt = [11 + (k * 53) % 900 for k in range(100)]
gen = run("generate", "--device", "cuda", "--model", model, "--max-tokens", "2",
          "--prompt-ids", ",".join(map(str, prompts[0])))
if "cannot run here" in gen.stderr:
    print("SKIP: no usable GPU:", gen.stderr.strip().splitlines()[-1])
    sys.exit(77)


def serve(name, extra):
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as f:
        f.write(f"model: {model}\ndevice: cuda\nserved_model_name: {name}\nmax_model_len: 256\n"
                "num_kv_blocks: 256\nport: 0\n" + extra)
    served = run("serve", path)
    m = re.search(r"at (http://\S+)/v1", served.stdout)
    if served.returncode != 0 or not m:
        fail(f"cluster serve {name}: rc={served.returncode} {served.stdout!r} {served.stderr!r}")
    return m.group(1)


def complete(base, name, p):
    body = {"model": name, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return json.loads(post(base, "/v1/completions", body)[1])["choices"][0]["token_ids"]


def logs_say(text):
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            if f.endswith(".log"):
                with open(os.path.join(dirpath, f), errors="replace") as log:
                    if text in log.read():
                        return True
    return False


def check_1p1d(name, kv_provider, extra, staged):
    base = serve(name, "disaggregation:\n  prefill: {replicas: 1}\n  decode: {replicas: 1}\n"
                 f"  provider: {kv_provider}\n  staging_tokens: 64\n" + extra)
    status = json.loads(run("status", "--json").stdout)
    dep = next(d for d in status["deployments"] if d["name"] == name)
    nodes = {r["node_id"] for r in dep["ranks"]}
    transfer = dep.get("transfer", "")
    print(f"{name} transfer:", transfer)
    if len(nodes) != 2:
        fail(f"prefill and decode ranks share a node: {dep['ranks']}")
    if staged and "staged through host memory" not in transfer:
        fail(f"the GPU KV is not staged: {transfer}")
    if not staged and ("KV by CUDA IPC (same host)" not in transfer or "staged" in transfer):
        fail(f"the GPU KV does not go by CUDA IPC: {transfer}")
    if not staged and not logs_say(f"serving: '{name}': every rank runs on host"):
        fail("the serve log does not say the KV goes by CUDA IPC")

    def tiny(p):
        return complete(base, name, p)

    alone = [tiny(p) for p in prompts]
    for i, (got, exp) in enumerate(zip(alone, want)):
        if got != exp:
            fail(f"{name}: prompt {i} ({len(prompts[i])} tokens): 1P1D {got} != colocated {exp}")
    together = [None] * len(prompts)

    def one(i):
        together[i] = tiny(prompts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if together != alone:
        fail(f"{name}: concurrent {together} != one at a time {alone}")

    def metric(metric_name):
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        found = re.search("^" + re.escape(metric_name) + r"\{[^}]*\} (\S+)$", text, re.M)
        if not found:
            fail(f"{metric_name} missing from /metrics")
        return float(found.group(1))

    handed, local = metric("troupe_kv_handoffs_total"), metric("troupe_kv_local_prefills_total")
    # Staged, 64 tokens of room: the 61-token prompt fits alone; at once they wait for landing
    # blocks in turn. Every request was handed off, none failed.
    if handed != 2 * len(prompts) or local != 0:
        fail(f"{name}: {handed} handoffs and {local} local prefills for {2 * len(prompts)} "
             "requests")
    if metric("troupe_kv_handoff_failures_total") != 0:
        fail(f"{name}: handoffs failed")
    if tiny(long_prompt) != want_long:
        fail(f"{name}: the {len(long_prompt)}-token prompt differs from colocated")
    if staged and metric("troupe_kv_local_prefills_total") != local + 1:
        fail("the prompt longer than the staging room was not prefilled on the decode replica")
    if not staged and metric("troupe_kv_handoffs_total") != handed + 1:
        fail("by CUDA IPC the long prompt was not handed off (nothing limits it)")
    deadline = time.time() + 20
    while metric("troupe_kv_blocks_in_use") > 0 and time.time() < deadline:
        time.sleep(0.05)
    if metric("troupe_kv_blocks_in_use") != 0:
        fail(f"{name}: KV blocks still in use after every request ended")
    moved = int(metric("troupe_kv_transfer_bytes_total"))
    if moved <= 0:
        fail(f"{name}: no KV bytes moved")
    print(f"1P1D between node processes on cuda, {transfer}:",
          int(metric("troupe_kv_handoffs_total")), "handoffs,", moved, "bytes; greedy == colocated")
    stop = run("serve", "--stop", name)
    if stop.returncode != 0:
        fail(f"serve --stop {name}: {stop.stdout} {stop.stderr}")


head = run("start", "--head", "--port", "0", timeout=60)
join = re.search(r"cluster join (\S+) --token (\S+) --ca-sha256 (\S+)", head.stdout)
if head.returncode != 0 or not join:
    fail(f"cluster start --head: {head.stdout} {head.stderr}")
try:
    node = run("join", join.group(1), "--token", join.group(2), "--ca-sha256", join.group(3),
               "--temp-dir", node_dir, timeout=60)
    if node.returncode != 0:
        fail(f"cluster join: {node.stdout} {node.stderr}")
    deadline = time.time() + 30
    while time.time() < deadline:
        status = json.loads(run("status", "--json").stdout or "{}")
        if len(status.get("nodes", [])) >= 2:
            break
        time.sleep(0.5)
    else:
        fail(f"the second node never showed up: {status}")
    solo = serve("solo", "")
    want = [complete(solo, "solo", p) for p in prompts]
    want_long = complete(solo, "solo", long_prompt)
    stop = run("serve", "--stop", "solo")
    if stop.returncode != 0:
        fail(f"serve --stop solo: {stop.stdout} {stop.stderr}")
    check_1p1d("ipc", "auto", "", staged=False)
    check_1p1d("staged", provider, "  staging: always\n", staged=True)
finally:
    stop_all()
print("PASS")
