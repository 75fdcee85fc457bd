#!/usr/bin/env python3
"""Prefill/decode disaggregation on one GPU: `cluster serve --block` with device: cuda serves the
golden tiny-qwen3 model colocated, then as 1P1D (both groups on the one GPU, each with half of
gpu_memory_utilization, KV moved by the local transport's device copies). Greedy token ids of
several concurrent completions and of seeded sampled ones sent one at a time must be equal (in
bf16 a batch's composition can flip a sampled near-tie, so sampling is compared alone); the handoffs must
have happened (troupe_kv_handoffs_total) and no KV block stays in use. Skips (77) without a GPU.
Usage: disagg_cuda_e2e.py PATH/TO/cluster GOLDEN_DIR."""
import json, os, re, subprocess, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model, post  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-disagg-cuda-")
common = (f"model: {model}\ndevice: cuda\nserved_model_name: tiny\nmax_model_len: 256\n"
          "gpu_memory_utilization: 0.5\nport: 0\n")
prompts = [[11 + (k * 37 + i * 101) % 900 for k in range(9 + 13 * i)] for i in range(6)]


def serve(yaml_text):
    path = os.path.join(tmp, "model.yaml")
    with open(path, "w") as f:
        f.write(yaml_text)
    proc = subprocess.Popen([cluster, "serve", path, "--block"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"at (http://\S+)/v1", line)
    if not m:
        proc.kill()
        err = proc.stderr.read()
        if "device: cuda cannot run here" in err:
            print("SKIP: no usable GPU; the server said:", err.strip().splitlines()[-1])
            sys.exit(77)
        fail(f"no endpoint line: {line!r} {err}")
    return proc, m.group(1)


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    m = re.search("^" + re.escape(name) + r"\{[^}]*\} (\S+)$", text, re.M)
    if not m:
        fail(f"{name} missing from /metrics")
    return float(m.group(1))


def run(base, sampling, concurrent):
    out = [None] * len(prompts)

    def one(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 12, "ignore_eos": True,
                "return_token_ids": True, **sampling}
        out[i] = json.loads(post(base, "/v1/completions", body)[1])["choices"][0]["token_ids"]

    if not concurrent:
        for i in range(len(prompts)):
            one(i)
        return out
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


greedy = {"temperature": 0}
seeded = {"temperature": 0.8, "top_p": 0.9, "seed": 1234, "frequency_penalty": 0.3}
results = {}
for name, extra in [("colocated", ""),
                    ("1P1D", "disaggregation:\n  prefill: {replicas: 1}\n  decode: {replicas: 1}\n"
                             "  provider: local\n")]:
    proc, base = serve(common + extra)
    try:
        # Sampling compares one request at a time: in bf16 a batch's composition moves logits by
        # an ulp, which can flip a sampled near-tie (greedy argmax is robust to it).
        results[name] = (run(base, greedy, True), run(base, seeded, False))
        if name == "1P1D":
            handed = metric(base, "troupe_kv_handoffs_total")
            if handed != 2 * len(prompts):
                fail(f"{handed} handoffs for {2 * len(prompts)} requests")
            deadline = time.time() + 20
            while metric(base, "troupe_kv_blocks_in_use") > 0 and time.time() < deadline:
                time.sleep(0.05)
            if metric(base, "troupe_kv_blocks_in_use") != 0:
                fail("KV blocks still in use after every request ended")
            print("1P1D on cuda:", int(handed), "handoffs,",
                  int(metric(base, "troupe_kv_transfer_bytes_total")), "bytes moved")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
if results["1P1D"][0] != results["colocated"][0]:
    fail(f"greedy: 1P1D {results['1P1D'][0]} != colocated {results['colocated'][0]}")
if results["1P1D"][1] != results["colocated"][1]:
    fail(f"seeded: 1P1D {results['1P1D'][1]} != colocated {results['colocated'][1]}")
print("1P1D on cuda == colocated:", len(prompts), "greedy requests at once, as many seeded ones "
      "in turn")
