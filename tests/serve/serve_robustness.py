#!/usr/bin/env python3
"""Serving robustness (issue 9): 1,000 requests against one `cluster serve --block` on the golden
tiny-qwen3 model, from 8 client threads over raw sockets (stdlib only). Mixed in with normal
streaming and non-streaming requests: clients that disconnect mid-stream (FIN or RST), before the
first byte, or in the middle of sending a body; malformed JSON; bad parameters; prompts longer
than the context; unknown routes and models. Every error must be OpenAI's error JSON with the
right status and param. Afterwards the server still answers, /metrics shows 0 KV blocks in use
and 0 running/waiting sequences, the RSS after all 1,000 requests is within MARGIN of the RSS
after the first 200, and the server exits 0 on SIGTERM (under ASan that includes LeakSanitizer).
Usage: serve_robustness.py PATH/TO/cluster GOLDEN_DIR. Exit 77 = skipped."""
import json, os, random, re, signal, socket, struct, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
TOTAL, WARMUP, THREADS = 1000, 200, 8
MAX_MODEL_LEN = 256
# RSS after 1,000 requests may exceed RSS after 200 by at most this (allocator caches and thread
# stacks settle; a leak of one prompt's or one stream's state per request would exceed it).
MARGIN_BYTES, MARGIN_FRAC = 24 << 20, 0.10
tmp = tempfile.mkdtemp(prefix="troupe-robust-")
failures = []
fail_lock = threading.Lock()


def note(msg):
    with fail_lock:
        failures.append(msg)


def raw_request(port, method, path, body=b"", timeout=120):
    """One request with Connection: close, read to EOF: (status, headers text, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head[9:12]) if len(head) >= 12 else 0
    return status, head.decode(errors="replace"), rest


def post(port, path, obj):
    return raw_request(port, "POST", path, json.dumps(obj).encode())


def expect_error(kind, got, status, param=None, what=None):
    code, head, body = got
    if code != status:
        return note(f"{kind}: status {code} != {status}: {body[:200]!r}")
    if "application/json" not in head:
        return note(f"{kind}: error without a JSON content type: {head!r}")
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return note(f"{kind}: not OpenAI error JSON: {body[:200]!r}")
    want_type = {400: "invalid_request_error", 404: "not_found_error"}[status]
    if err.get("type") != want_type or err.get("code") != status or not err.get("message"):
        note(f"{kind}: error fields {err}")
    if param is not None and err.get("param") != param:
        note(f"{kind}: param {err.get('param')!r} != {param!r} ({err.get('message')})")
    if what is not None and what not in err.get("message", ""):
        note(f"{kind}: message {err.get('message')!r} does not mention {what!r}")


def sse(body):
    return [l[6:] for l in body.decode().split("\n") if l.startswith("data: ")]


def normal_stream(port, rng, chat):
    n = rng.randint(1, 4)
    req = {"model": "tiny", "max_tokens": n, "ignore_eos": True, "stream": True,
           "stream_options": {"include_usage": True}, "temperature": rng.choice([0, 0.8])}
    if chat:
        req["messages"] = [{"role": "user", "content": f"request {rng.random()}"}]
    else:
        req["prompt"] = f"count to {rng.randint(1, 99)} please"
    code, head, body = post(port, "/v1/chat/completions" if chat else "/v1/completions", req)
    if code != 200 or "text/event-stream" not in head:
        return note(f"stream: {code} {body[:200]!r}")
    events = sse(body)
    if not events or events[-1] != "[DONE]":
        return note(f"stream: no [DONE]: {events[-2:]}")
    usage = json.loads(events[-2]).get("usage")
    if not usage or usage["completion_tokens"] != n:
        note(f"stream: usage {usage} for max_tokens {n}")


def normal_plain(port, rng):
    n = rng.randint(1, 3)
    code, _, body = post(port, "/v1/completions", {"prompt": "hello there", "max_tokens": n,
                                                   "ignore_eos": True, "temperature": 0})
    if code != 200:
        return note(f"plain: {code} {body[:200]!r}")
    j = json.loads(body)
    if j["usage"]["completion_tokens"] != n or j["choices"][0]["finish_reason"] != "length":
        note(f"plain: {j}")


def disconnect(port, rng, mode):
    """A long stream the client abandons: after k chunks (FIN or RST), or before any byte."""
    body = json.dumps({"model": "tiny", "prompt": f"a long story {rng.random()}", "max_tokens": 200,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        if mode == "mid-body":  # the body is cut short: the server must drop the connection
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                      "\r\n".encode() + body[: len(body) // 2])
            return
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if mode == "before-first-byte":
            return
        want, got = rng.randint(1, 3), b""
        while got.count(b"data: ") < want:
            chunk = s.recv(4096)
            if not chunk:
                return note("disconnect: the server closed a 200-token stream early")
            got += chunk
        if mode == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def one(port, i):
    rng = random.Random(i)
    kind = rng.choices(["stream", "chat-stream", "plain", "fin", "rst", "before-first-byte",
                        "mid-body", "malformed", "bad-param", "too-long", "route", "model"],
                       weights=[30, 10, 8, 10, 5, 4, 3, 8, 10, 6, 3, 3])[0]
    if kind == "stream":
        normal_stream(port, rng, chat=False)
    elif kind == "chat-stream":
        normal_stream(port, rng, chat=True)
    elif kind == "plain":
        normal_plain(port, rng)
    elif kind in ("fin", "rst", "before-first-byte", "mid-body"):
        disconnect(port, rng, kind)
    elif kind == "malformed":
        body = rng.choice([b'{"prompt": "x", "max_tokens": ', b"not json at all", b"",
                           b'{"prompt": "x"}}', b"\xff\xfe{", b"[1, 2, 3]", b'"just a string"'])
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        expect_error("malformed", raw_request(port, "POST", path, body), 400)
    elif kind == "bad-param":
        case = rng.randrange(9)
        req = {"prompt": "hi", "max_tokens": 4, "stream": rng.random() < 0.5}
        param, what = None, None
        if case == 0:
            req["max_tokens"], param = -3, "max_tokens"
        elif case == 1:
            req["max_tokens"], param = "lots", "max_tokens"
        elif case == 2:
            req["n"], param = 100, "n"
        elif case == 3:
            req["temperature"], what = -1.0, "temperature"
        elif case == 4:
            req["top_p"], what = 1.5, "top_p"
        elif case == 5:
            req["logprobs"], param = 50, "logprobs"
        elif case == 6:
            req["stop"], param = [""], "stop"
        elif case == 7:
            req["prompt"], param = [], "prompt"
        else:
            req["stream"], param = "yes", "stream"
        expect_error(f"bad-param {case}", post(port, "/v1/completions", req), 400, param, what)
    elif kind == "too-long":
        if rng.random() < 0.5:  # the prompt alone exceeds the context
            req = {"prompt": list(range(100, 100 + MAX_MODEL_LEN + rng.randint(0, 50))),
                   "max_tokens": 4, "stream": True}
            expect_error("too-long prompt", post(port, "/v1/completions", req), 400, "prompt",
                         "maximum context length")
        else:  # prompt + max_tokens exceeds it
            req = {"prompt": list(range(100, 300)), "max_tokens": 100}
            expect_error("too-long max_tokens", post(port, "/v1/completions", req), 400,
                         "max_tokens", "maximum context length")
    elif kind == "route":
        expect_error("route", raw_request(port, "GET", "/v1/nope"), 404)
    else:
        expect_error("model", post(port, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                     "model")
    return kind


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def metrics(port):
    code, _, body = raw_request(port, "GET", "/metrics")
    if code != 200:
        fail(f"/metrics: {code}")
    vals = {}
    for line in body.decode().splitlines():
        m = re.match(r"(troupe_\w+)\{[^}]*\} (\S+)$", line)
        if m:
            vals[m.group(1)] = float(m.group(2))
    return vals


def drain(port, deadline_s=30):
    """Waits until cancellations have reached the engine: nothing running or waiting, no blocks."""
    end = time.time() + deadline_s
    while True:
        m = metrics(port)
        idle = (m["troupe_kv_blocks_in_use"], m["troupe_num_requests_running"],
                m["troupe_num_requests_waiting"]) == (0, 0, 0)
        if idle or time.time() > end:
            return m
        time.sleep(0.2)


yaml = os.path.join(tmp, "model.yaml")
with open(yaml, "w") as f:
    f.write(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: {MAX_MODEL_LEN}\n"
            "num_kv_blocks: 96\nmax_num_seqs: 8\nport: 0\n")
env = dict(os.environ)
# Under ASan, a small quarantine so freed memory is reused and RSS means something.
env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=8").lstrip(":")
proc = subprocess.Popen([cluster, "serve", yaml, "--block"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, env=env)
stderr_lines = []
try:
    line = proc.stdout.readline()
    m = re.search(r"at http://[0-9.]+:(\d+)/v1", line)
    if not m:
        proc.kill()
        fail(f"no endpoint line: {line!r} {proc.stderr.read()}")
    port = int(m.group(1))
    threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True).start()
    t0 = time.time()
    kinds = {}
    with ThreadPoolExecutor(THREADS) as pool:
        for k in pool.map(lambda i: one(port, i), range(WARMUP)):
            kinds[k] = kinds.get(k, 0) + 1
        m200 = drain(port)
        rss200 = rss_kib(proc.pid)
        for k in pool.map(lambda i: one(port, i), range(WARMUP, TOTAL)):
            kinds[k] = kinds.get(k, 0) + 1
    elapsed = time.time() - t0
    m1000 = drain(port)
    rss1000 = rss_kib(proc.pid)
    print(f"{TOTAL} requests in {elapsed:.1f} s: {dict(sorted(kinds.items()))}")
    print(f"RSS after {WARMUP}: {rss200 / 1024:.1f} MiB, after {TOTAL}: {rss1000 / 1024:.1f} MiB")
    if proc.poll() is not None:
        fail(f"the server died: rc={proc.returncode} {''.join(stderr_lines[-20:])}")
    if failures:
        print("\n".join(failures[:20]))
        fail(f"{len(failures)} requests went wrong")
    for key in ("troupe_kv_blocks_in_use", "troupe_num_requests_running",
                "troupe_num_requests_waiting"):
        if m1000[key] != 0:
            fail(f"after {TOTAL} requests /metrics shows {key} = {m1000[key]}")
    margin = max(MARGIN_BYTES, MARGIN_FRAC * rss200 * 1024)
    if (rss1000 - rss200) * 1024 > margin:
        fail(f"RSS grew by {(rss1000 - rss200) / 1024:.1f} MiB (margin {margin / 2**20:.1f} MiB)")
    # Still serving: a normal request, streamed and not.
    normal_plain(port, random.Random(-1))
    normal_stream(port, random.Random(-2), chat=True)
    if failures:
        fail(f"after the run: {failures}")
    print("metrics after:", {k: v for k, v in m1000.items() if "blocks" in k or "requests" in k})
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("the server did not stop within 60 s of SIGTERM")
if rc != 0:
    time.sleep(0.5)
    fail(f"the server exited with {rc}: {''.join(stderr_lines[-40:])}")
print("PASS")
