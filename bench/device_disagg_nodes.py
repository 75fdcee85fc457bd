#!/usr/bin/env python3
"""Prefill/decode disaggregation between node processes on the lent GPU: `cluster start --head`
and a `cluster join`ed second node daemon on the same host (both see the one GPU), then `cluster
serve` of a random-weight Qwen3 model of a real shape (bench/make_random_qwen3.py), first
colocated (one replica), then 1P1D with the groups on the two nodes, once per PROVIDER given
(auto: CUDA IPC, device to device, the processes being on one host; tcp: libfabric's tcp
provider, which cannot register GPU memory, so the KV is staged through page-locked host memory
on both sides). For each prompt length serve_bench sends N requests one
at a time; the TTFT difference is what the handoff adds. /metrics gives the bytes moved and the
transfer time (from a rank's first write to its last: the prefill ranks push each layer while the
later ones compute, so the transfer overlaps the prefill and the added TTFT is what is left of it).
The greedy token ids of a 513-token prompt are compared. Logs go to $OUT.
Usage: device_disagg_nodes.py BUNDLE_BIN MODEL_DIR [PROVIDER...]   (LENS, N, OUT_LEN in the env)"""
import json, os, re, subprocess, sys, tempfile, time, urllib.request

bin_dir, model = sys.argv[1], sys.argv[2]
providers = sys.argv[3:] or ["auto", "tcp"]
cluster, serve_bench = os.path.join(bin_dir, "cluster"), os.path.join(bin_dir, "serve_bench")
out = os.environ.get("OUT", "/tmp")
lens = [int(x) for x in os.environ.get("LENS", "512 2048 8192").split()]
n, out_len = int(os.environ.get("N", "5")), int(os.environ.get("OUT_LEN", "16"))
tmp = tempfile.mkdtemp(prefix="troupe-disagg-nodes-bench-")
env = dict(os.environ, TROUPE_TEMP_DIR=os.path.join(tmp, "head"))
node_dir = os.path.join(tmp, "node")
name = os.path.basename(model.rstrip("/"))


def run(*args, timeout=600):
    return subprocess.run([cluster, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def metric(base, key):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    m = re.search("^" + re.escape(key) + r"(\{[^}]*\})? (\S+)$", text, re.M)
    return float(m.group(2)) if m else float("nan")


def serve(tag, extra):
    path = os.path.join(tmp, tag + ".yaml")
    with open(path, "w") as f:
        f.write(f"model: {model}\ndevice: cuda\nserved_model_name: {tag}\nmax_model_len: 8448\n"
                "max_num_seqs: 8\nmax_num_batched_tokens: 8448\nnum_kv_blocks: 1100\nport: 0\n"
                + extra)
    served = run("serve", path)
    m = re.search(r"at (http://\S+)/v1", served.stdout)
    if served.returncode != 0 or not m:
        sys.exit(f"cluster serve {tag}: rc={served.returncode} {served.stdout} {served.stderr}")
    return m.group(1)


def measure(tag, base):
    body = {"model": tag, "prompt": list(range(100, 613)), "max_tokens": 32, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    ids = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]["token_ids"]
    ttft = {}
    for length in lens:
        before = [metric(base, k) for k in ("troupe_kv_transfer_bytes_total",
                                            "troupe_kv_transfer_seconds_sum")]
        result = os.path.join(tmp, f"nodes-{tag}-{length}.json")
        with open(os.path.join(tmp, f"serve_bench-nodes-{tag}-{length}.log"), "w") as log:
            subprocess.run([serve_bench, "--base-url", base, "--endpoint", "/v1/completions",
                            "--model", tag, "--tokenizer", model, "--dataset-name", "random",
                            "--random-input-len", str(length), "--random-output-len", str(out_len),
                            "--ignore-eos", "--num-prompts", str(n), "--max-concurrency", "1",
                            "--seed", "1", "--result-file", result], stdout=log,
                           stderr=subprocess.STDOUT, timeout=600)
        with open(result) as f:
            r = json.load(f)
        ttft[length] = (r["mean_ttft_ms"], r["median_ttft_ms"], r.get("mean_tpot_ms", 0))
        moved, secs = (metric(base, k) - b for k, b in zip(
            ("troupe_kv_transfer_bytes_total", "troupe_kv_transfer_seconds_sum"), before))
        per = f"; transfer {moved / n / 1e6:.0f} MB in {secs / n * 1e3:.1f} ms per request" \
            if secs == secs and secs > 0 else ""
        print(f"{tag} in={length}: TTFT mean {ttft[length][0]:.1f} ms, median "
              f"{ttft[length][1]:.1f} ms, TPOT mean {ttft[length][2]:.2f} ms{per}", flush=True)
    return ids, ttft


head = run("start", "--head", "--port", "0", timeout=60)
join = re.search(r"cluster join (\S+) --token (\S+) --ca-sha256 (\S+)", head.stdout)
if head.returncode != 0 or not join:
    sys.exit(f"cluster start --head: {head.stdout} {head.stderr}")
try:
    node = run("join", join.group(1), "--token", join.group(2), "--ca-sha256", join.group(3),
               "--temp-dir", node_dir, timeout=60)
    if node.returncode != 0:
        sys.exit(f"cluster join: {node.stdout} {node.stderr}")
    for _ in range(60):
        if len(json.loads(run("status", "--json").stdout or "{}").get("nodes", [])) >= 2:
            break
        time.sleep(0.5)
    solo = serve("solo", "")
    want, t_solo = measure("solo", solo)
    run("serve", "--stop", "solo")
    for provider in providers:
        tag = "split-" + provider
        split = serve(tag, "disaggregation:\n  prefill: {replicas: 1}\n  decode: {replicas: 1}\n"
                      f"  provider: {provider}\n  staging_tokens: 8448\n")
        dep = next(d for d in json.loads(run("status", "--json").stdout)["deployments"]
                   if d["name"] == tag)
        print(f"{tag}: transfer: {dep.get('transfer')}; nodes: "
              f"{len({r['node_id'] for r in dep['ranks']})}")
        got, t_split = measure(tag, split)
        handoffs = metric(split, "troupe_kv_handoffs_total")
        moved = metric(split, "troupe_kv_transfer_bytes_total")
        secs = metric(split, "troupe_kv_transfer_seconds_sum")
        local = metric(split, "troupe_kv_local_prefills_total")
        print(f"{tag}: {int(handoffs)} handoffs, {int(local)} local prefills, {moved / 1e9:.2f} GB "
              f"in {secs:.3f} s of transfer time ({moved / secs / 1e9 if secs else 0:.2f} GB/s "
              "while transferring)")
        for length in lens:
            added = t_split[length][1] - t_solo[length][1]
            print(f"{tag} in={length}: TTFT median colocated {t_solo[length][1]:.1f} ms, 1P1D "
                  f"{t_split[length][1]:.1f} ms, added {added:+.1f} ms")
        print(f"{tag} greedy ids:", "1P1D == colocated" if got == want else f"DIFFER {want} {got}")
        run("serve", "--stop", tag)
finally:
    run("stop", "--temp-dir", node_dir)
    run("stop")
    # What the daemons logged about handoffs and failures, for the record.
    with open(os.path.join(out, "nodes-daemons.txt"), "w") as notes:
        for root in (os.path.join(tmp, "head"), node_dir):
            for dirpath, _, files in os.walk(root):
                for name in files:
                    if name.endswith(".log"):
                        with open(os.path.join(dirpath, name), errors="replace") as f:
                            hits = [line for line in f if re.search(
                                r"warn|error|fail|handoff|staged|IPC|linked", line, re.I)]
                        notes.write(f"--- {name}: {len(hits)} lines\n" + "".join(hits[-80:]))
