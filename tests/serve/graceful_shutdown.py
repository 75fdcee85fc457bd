#!/usr/bin/env python3
"""SIGTERM to `cluster serve --block` while a stream runs (golden tiny-qwen3): with a grace
period the stream completes ([DONE]) and new connections are refused; with --grace 0 it ends
with an `error` event saying the server shuts down. Never a stream cut short without either.
Usage: graceful_shutdown.py PATH/TO/cluster GOLDEN_DIR. Exit 77 = skipped."""
import http.client, json, os, re, signal, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-shutdown-")
path = os.path.join(tmp, "model.yaml")
with open(path, "w") as f:
    f.write(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: 2048\n"
            "num_kv_blocks: 256\nport: 0\nmax_num_seqs: 1\n")


def serve(grace):
    p = subprocess.Popen([cluster, "serve", path, "--block", "--grace", str(grace)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    m = re.search(r"at http://([\d.]+):(\d+)/v1", p.stdout.readline())
    if not m:
        p.kill()
        fail(f"no endpoint: {p.stderr.read()}")
    return p, m.group(1), int(m.group(2))


def open_stream(host, port, max_tokens):
    c = http.client.HTTPConnection(host, port, timeout=120)
    c.request("POST", "/v1/completions",
              json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens,
                          "ignore_eos": True, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        fail(f"stream: {r.status} {r.read()!r}")
    first = r.fp.readline()  # the first event: the request runs
    if not first.startswith(b"data: "):
        fail(f"first stream line {first!r}")
    return c, r


def rest(r):
    """The events after the first, up to the end of the connection."""
    events = []
    for line in r.fp:
        if line.startswith(b"data: "):
            events.append(line[6:].strip().decode())
    return events


# A grace period: the stream in flight completes, the listener is closed, exit 0.
proc, host, port = serve(60)
try:
    c, r = open_stream(host, port, 400)
    proc.send_signal(signal.SIGTERM)
    events = rest(r)
    if not events or events[-1] != "[DONE]":
        fail(f"with a grace period the stream did not complete: {events[-2:]}")
    tokens = sum(1 for e in events[:-1] if json.loads(e).get("choices"))
    time.sleep(0.5)
    try:
        socket.create_connection((host, port), timeout=2).close()
        if proc.poll() is None:
            fail("new connections still accepted while shutting down")
    except OSError:
        pass
    if proc.wait(timeout=60) != 0:
        fail(f"exit {proc.returncode}")
    print(f"grace 60 s: the stream completed ({tokens + 1} chunks), exit 0")
finally:
    if proc.poll() is None:
        proc.kill()

# No grace: the stream ends with an error event, not a silent cut.
proc, host, port = serve(0)
try:
    c, r = open_stream(host, port, 2000)
    proc.send_signal(signal.SIGTERM)
    events = rest(r)
    if not events:
        fail("the stream was cut without an error event")
    last = events[-1]
    if last == "[DONE]":
        fail("a 2000-token stream finished within grace 0 (the test needs it to be cut)")
    err = json.loads(last).get("error")
    if not err or "shutting down" not in err["message"]:
        fail(f"last event is not the shutdown error: {last}")
    if proc.wait(timeout=60) != 0:
        fail(f"exit {proc.returncode}")
    log = proc.stderr.read()
    if "did not finish within 0 s" not in log:
        fail(f"the log does not say requests were ended: {log[-2000:]}")
    print("grace 0: the stream ended with an error event:", err["message"])
finally:
    if proc.poll() is None:
        proc.kill()
print("PASS")
