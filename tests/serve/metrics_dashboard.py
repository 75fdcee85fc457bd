#!/usr/bin/env python3
"""/metrics as Prometheus tooling sees it, on a live `cluster serve --block` (golden tiny-qwen3):
parsed with prometheus_client (PyPI, through scripts/py_venv.sh), every sample labelled
model_name, vLLM's families present beside troupe's, finish reasons counted, and every query of
the shipped Grafana dashboard (examples/grafana/troupe-dashboard.json) naming metrics and labels
that exist. HEAD on every route answers without a body; with an API key, /health and /metrics
stay open only when open_health_metrics is set. With --log-format json every log line is a JSON
object, with an access line per request and the periodic stats line.
Usage: metrics_dashboard.py PATH/TO/cluster GOLDEN_DIR. Exit 77 = skipped."""
import http.client, json, os, re, signal, subprocess, sys, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # re-run under the project's venv (scripts/py_venv.sh installs the pins)
    if os.environ.get("TROUPE_IN_VENV"):
        raise
    try:
        py = subprocess.run([os.path.join(root, "scripts", "py_venv.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        print("SKIP: cannot set up the Python venv (PyPI unreachable?):", e.stderr[-500:])
        sys.exit(1 if os.environ.get("CI") == "true" else 77)
    os.environ["TROUPE_IN_VENV"] = "1"
    os.execv(py, [py, *sys.argv])

sys.path.insert(0, here)
from serve_util import fail, golden_model  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-metrics-")
KEY = "sekret"


def serve(open_health, *extra):
    path = os.path.join(tmp, "model.yaml")
    with open(path, "w") as f:
        f.write(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: 256\n"
                f"num_kv_blocks: 64\nport: 0\napi_key: {KEY}\n"
                f"open_health_metrics: {'true' if open_health else 'false'}\n"
                "log_stats_interval_s: 0.2\n")
    p = subprocess.Popen([cluster, "serve", path, "--block", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"at http://([\d.]+):(\d+)/v1", line)
    if not m:
        p.kill()
        fail(f"no endpoint line: {line!r} {p.stderr.read()}")
    return p, m.group(1), int(m.group(2))


def call(host, port, method, path, body=None, key=KEY):
    c = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    c.request(method, path, json.dumps(body) if body is not None else None, headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data.decode()


def stop(p):
    p.send_signal(signal.SIGTERM)
    if p.wait(timeout=60) != 0:
        fail(f"server exit {p.returncode}: {p.stderr.read()}")
    return p.stderr.read()


proc, host, port = serve(True, "--log-format", "json")
try:
    # HEAD: never a body, whatever the route and status.
    routes = ["/health", "/metrics", "/version", "/v1/models", "/v1/chat/completions",
              "/v1/completions", "/tokenize", "/detokenize", "/no/such/route"]
    for route in routes:
        status, body = call(host, port, "HEAD", route)
        if body:
            fail(f"HEAD {route}: {status} with a body {body[:80]!r}")
        if route in ("/health", "/metrics", "/version", "/v1/models") and status != 200:
            fail(f"HEAD {route}: {status}")
    # The API key: /health and /metrics open (open_health_metrics: true), the rest guarded.
    if call(host, port, "GET", "/health", key=None)[0] != 200:
        fail("/health without the key is not open")
    if call(host, port, "GET", "/v1/models", key=None)[0] != 401:
        fail("/v1/models without the key is not refused")

    msgs = [{"role": "user", "content": "Hello"}]
    for body in ({"messages": msgs, "max_tokens": 4, "ignore_eos": True},
                 {"messages": msgs, "max_tokens": 6, "ignore_eos": True, "stream": True},
                 {"messages": msgs, "max_tokens": 3, "ignore_eos": True, "temperature": 0}):
        status, text = call(host, port, "POST", "/v1/chat/completions", body)
        if status != 200:
            fail(f"completion: {status} {text}")

    status, text = call(host, port, "GET", "/metrics", key=None)
    if status != 200:
        fail(f"/metrics without the key: {status}")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for f in families.values():
        for s in f.samples:
            if s.labels.get("model_name") != "tiny":
                fail(f"sample {s.name}{s.labels} has no model_name=\"tiny\"")
            samples.setdefault(s.name, []).append(s)

    want = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
            "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
            "vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
            "vllm:request_time_per_output_token_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
            "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket",
            "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
            "troupe_requests_total", "troupe_time_to_first_token_seconds_bucket",
            "troupe_request_success_total", "troupe_replica_up"]
    for name in want:
        if name not in samples:
            fail(f"/metrics lacks {name}")

    def value(name, **labels):
        for s in samples.get(name, []):
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        fail(f"no sample {name}{labels}")

    if value("vllm:request_success_total", finished_reason="length") != 3:
        fail("three requests ended by max_tokens, request_success_total{finished_reason=length} "
             f"is {value('vllm:request_success_total', finished_reason='length')}")
    if value("vllm:generation_tokens_total") != 13:
        fail(f"generation_tokens_total {value('vllm:generation_tokens_total')} != 4 + 6 + 3")
    if value("vllm:request_generation_tokens_count") != 3:
        fail("request_generation_tokens_count != 3")
    if value("vllm:request_queue_time_seconds_count") != 3:
        fail("request_queue_time_seconds_count != 3 (the engine's queue time is missing)")
    if value("vllm:request_time_per_output_token_seconds_count") != 3:
        fail("request_time_per_output_token_seconds_count != 3")

    # The dashboard: every metric its queries name exists, with the labels they select on.
    with open(os.path.join(root, "examples", "grafana", "troupe-dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["query"]["query"])
    checked = 0
    for e in exprs:
        e = e.replace("$model_name", "tiny").replace("$__rate_interval", "1m")
        for name, sel in re.findall(r"((?:vllm:|troupe_)[A-Za-z0-9_:]+)(\{[^}]*\})?", e):
            if name not in samples:
                fail(f"dashboard query {e!r}: no metric {name}")
            for k, v in re.findall(r'(\w+)="([^"]*)"', sel or ""):
                if not any(s.labels.get(k) == v for s in samples[name]):
                    fail(f"dashboard query {e!r}: no {name} sample with {k}={v!r}")
            checked += 1
        for by in re.findall(r"by \(([^)]*)\)", e):
            metric = re.search(r"((?:vllm:|troupe_)[A-Za-z0-9_:]+)", e.split(f"by ({by})", 1)[1])
            for label in by.split(","):
                if not any(label.strip() in s.labels for s in samples[metric.group(1)]):
                    fail(f"dashboard query {e!r}: {metric.group(1)} has no label {label}")
    print(f"/metrics: {len(families)} families parsed; {len(exprs)} dashboard queries, "
          f"{checked} metric selectors found")
    time.sleep(0.6)  # a stats line or two
finally:
    log = stop(proc)

lines = [json.loads(l) for l in log.splitlines() if l.strip()]  # every line is JSON
msgs = [l["msg"] for l in lines if l["level"] == "info"]
access = [m for m in msgs if re.match(r"request chatcmpl-\d+ /v1/chat/completions status=200 "
                                      r"finish=length prompt_tokens=\d+ tokens=\d+ "
                                      r"ttft=[\d.]+s duration=[\d.]+s$", m)]
if len(access) != 3:
    fail(f"{len(access)} access lines for 3 requests: {msgs}")
if not any(m.startswith("stats: ") and "3 requests ended" in m for m in msgs):
    fail(f"no stats line: {msgs}")
if not any(m.startswith("device: auto") or m.startswith("loading ") for m in msgs):
    fail(f"no load lines: {msgs}")
print("JSON logs: access lines, stats line:", next(m for m in msgs if m.startswith("stats: ")))

# The secure default: with an API key, /metrics and /health need it too.
proc, host, port = serve(False)
try:
    for route in ("/metrics", "/health"):
        if call(host, port, "GET", route, key=None)[0] != 401:
            fail(f"{route} without the key is open by default")
    if call(host, port, "GET", "/metrics")[0] != 200:
        fail("/metrics with the key refused")
finally:
    stop(proc)
print("PASS")
