#!/usr/bin/env python3
"""Cold start of `cluster serve --block` with device: cuda on a model folder: seconds from the
process's start until it prints its serving line, until /health answers, and until a first
(then a second) completion of 16 tokens returns; the server's own log (stderr, with the load time
split) goes to LOG. Usage: coldstart.py CLUSTER MODEL_DIR NAME LOG"""
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main():
    cluster, model, name, log = sys.argv[1:5]
    yaml = (f"model: {model}\nserved_model_name: {name}\ndevice: cuda\nmax_model_len: 2048\n"
            "max_num_seqs: 64\nmax_num_batched_tokens: 8192\ngpu_memory_utilization: 0.85\nport: 0\n")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(yaml)
    err = open(log, "w")
    t0 = time.monotonic()
    p = subprocess.Popen([cluster, "serve", f.name, "--block"], stdout=subprocess.PIPE,
                         stderr=err, text=True)
    line = p.stdout.readline()
    t_line = time.monotonic() - t0
    m = re.search(r"http://[0-9.]+:\d+", line)
    if not m:
        print(f"{name}: no serving line after {t_line:.1f} s: {line!r}")
        p.kill()
        return 1
    base = m.group(0)
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.02)
    t_health = time.monotonic() - t0
    body = {"model": name, "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    out = post(base + "/v1/completions", body)
    t_first = time.monotonic() - t0
    t1 = time.monotonic()
    post(base + "/v1/completions", body)
    t_second = time.monotonic() - t1
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
    print(f"{name}: serving line {t_line:.2f} s, /health {t_health:.2f} s, first completion "
          f"done {t_first:.2f} s (its request {t_first - t_health:.2f} s), a second one "
          f"{t_second:.2f} s; {out['usage']['completion_tokens']} tokens each; {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
