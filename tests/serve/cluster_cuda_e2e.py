#!/usr/bin/env python3
"""End to end on the GPU through the head: `cluster start --head`, then `cluster serve model.yaml`
with device: cuda on the golden tiny-qwen3 model (the head places one rank on this host's GPU, the
node's worker actor loads the CUDA backend and samples on the GPU), a greedy chat request over
HTTP equals `cluster generate --device cuda`, `cluster status` lists the deployment, then
`cluster serve --stop` and `cluster stop`. Skips (exit 77) where no GPU is usable.
Usage: cluster_cuda_e2e.py PATH/TO/cluster GOLDEN_DIR."""
import json, os, re, subprocess, sys, tempfile, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_util  # noqa: E402
from serve_util import golden_model  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-cluster-cuda-")
env = dict(os.environ, TROUPE_TEMP_DIR=os.path.join(tmp, "troupe"))


def run(*args, timeout=300):
    return subprocess.run([cluster, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def fail(msg):
    serve_util.fail(msg, lambda: run("stop"))


with open(os.path.join(model, "golden.json")) as f:
    prompt = json.load(f)["cases"][0]["prompt_ids"]
gen = run("generate", "--device", "cuda", "--model", model, "--max-tokens", "8", "--ignore-eos",
          "--prompt-ids", ",".join(map(str, prompt)))
if "cannot run here" in gen.stderr:
    print("SKIP: no usable GPU:", gen.stderr.strip().splitlines()[-1])
    sys.exit(77)
want = re.search(r"^generated ids: (.*)$", gen.stdout, re.M)
if gen.returncode != 0 or not want:
    fail(f"cluster generate --device cuda: {gen.stdout!r} {gen.stderr!r}")

head = run("start", "--head", "--port", "0", timeout=60)
if head.returncode != 0:
    fail(f"cluster start --head: {head.stdout} {head.stderr}")
try:
    path = os.path.join(tmp, "model.yaml")
    with open(path, "w") as f:
        f.write(f"model: {model}\ndevice: cuda\nserved_model_name: tiny\nmax_model_len: 256\n"
                "port: 0\n")
    served = run("serve", path)
    m = re.search(r"at (http://\S+)/v1", served.stdout)
    if served.returncode != 0 or not m:
        fail(f"cluster serve: rc={served.returncode} {served.stdout!r} {served.stderr!r}")
    status = run("status")
    if "tiny" not in status.stdout or "ready" not in status.stdout:
        fail(f"status does not list the deployment as ready: {status.stdout}")
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(m.group(1) + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        ids = json.loads(r.read().decode())["choices"][0]["token_ids"]
    if ",".join(map(str, ids)) != want.group(1):
        fail(f"through the head on cuda {ids} != cluster generate --device cuda {want.group(1)}")
    print("greedy through the head (cuda worker) == cluster generate --device cuda:", ids)
    stop = run("serve", "--stop", "tiny")
    if stop.returncode != 0:
        fail(f"serve --stop: {stop.stdout} {stop.stderr}")
finally:
    run("stop")
print("PASS")
