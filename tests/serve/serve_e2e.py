#!/usr/bin/env python3
"""End to end with the real `cluster` binary: `cluster serve model.yaml --block` on the golden
tiny-qwen3 model, driven by Python's stdlib urllib (raw HTTP, no SDK): greedy chat through HTTP
equals `cluster generate` on the same prompt ids, streaming equals non-streaming, model.yaml
errors, and a clean SIGTERM stop. With SmolLM2 (TROUPE_SMOLLM2_GGUF), it must answer "Paris".
Usage: serve_e2e.py PATH/TO/cluster GOLDEN_DIR. Exit 77 = skipped."""
import json, os, re, signal, subprocess, sys, tempfile, time, urllib.error, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model, post  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-serve-")


def serve(yaml_text, *extra):
    path = os.path.join(tmp, "model.yaml")
    with open(path, "w") as f:
        f.write(yaml_text)
    return subprocess.Popen([cluster, "serve", path, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def endpoint(proc, deadline_s=120):
    start = time.time()
    line = proc.stdout.readline()  # the server prints its endpoint once it is listening
    m = re.search(r"at (http://\S+)/v1", line)
    if not m or time.time() - start > deadline_s:
        proc.kill()
        fail(f"no endpoint line: {line!r} {proc.stderr.read()}")
    return m.group(1)


# model.yaml errors: unknown key with suggestion, and no --block without a head to send it to.
p = serve(f"model: {model}\ndevice: cpu\nmax_num_seq: 4\n", "--block")
out, err = p.communicate(timeout=60)
if p.returncode != 2 or "did you mean 'max_num_seqs'" not in err:
    fail(f"unknown key: rc={p.returncode} {err!r}")
p = serve(f"model: {model}\ndevice: cpu\n", "--temp-dir", os.path.join(tmp, "no-session"))
out, err = p.communicate(timeout=60)
if p.returncode != 2 or "--block" not in err:
    fail(f"without --block and no head: rc={p.returncode} {err!r}")

proc = serve(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: 256\nnum_kv_blocks: 64\n"
             "port: 0\n", "--block")
try:
    base = endpoint(proc)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    status, text = post(base, "/v1/chat/completions",
                        {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True})
    j = json.loads(text)
    ids = j["choices"][0]["token_ids"]
    gen = subprocess.run([cluster, "generate", "--model", model, "--max-tokens", "8", "--ignore-eos",
                          "--prompt-ids", ",".join(map(str, j["prompt_token_ids"]))],
                         capture_output=True, text=True, timeout=120)
    want = re.search(r"^generated ids: (.*)$", gen.stdout, re.M).group(1)
    if ",".join(map(str, ids)) != want:
        fail(f"HTTP greedy {ids} != cluster generate {want}")
    status, text = post(base, "/v1/chat/completions",
                        {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0,
                         "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}})
    events = [l[6:] for l in text.split("\n") if l.startswith("data: ")]
    if events[-1] != "[DONE]":
        fail(f"stream does not end with [DONE]: {events[-3:]}")
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    if content != j["choices"][0]["message"]["content"]:
        fail(f"streamed {content!r} != {j['choices'][0]['message']['content']!r}")
    if chunks[-1]["usage"]["completion_tokens"] != 8:
        fail(f"usage chunk: {chunks[-1]}")
    try:
        post(base, "/v1/chat/completions", {"model": "nope", "messages": msgs})
        fail("unknown model accepted")
    except urllib.error.HTTPError as e:
        if e.code != 404 or json.loads(e.read())["error"]["param"] != "model":
            fail(f"unknown model: {e.code}")
    print("tiny-qwen3: HTTP greedy == cluster generate:", ids)
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("server did not stop within 30 s of SIGTERM")
if rc != 0:
    fail(f"server exited with {rc}: {proc.stderr.read()}")

gguf = os.environ.get("TROUPE_SMOLLM2_GGUF")
if gguf and os.path.isfile(gguf):
    proc = serve(f"model: {gguf}\nmax_model_len: 512\nport: 0\n", "--block")
    try:
        base = endpoint(proc)
        status, text = post(base, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                             "max_tokens": 32, "temperature": 0}, timeout=300)
        answer = json.loads(text)["choices"][0]["message"]["content"]
        print("SmolLM2:", answer)
        if "Paris" not in answer:
            fail(f"SmolLM2 did not answer Paris: {answer!r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
else:
    print("SmolLM2 part skipped: TROUPE_SMOLLM2_GGUF not set")
print("PASS")
