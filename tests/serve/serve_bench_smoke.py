#!/usr/bin/env python3
"""bench/serve_bench against a real `cluster serve --block --port 0` on the golden tiny-qwen3 model:
random prompts with --ignore-eos at concurrency 1 and 4 (and a Poisson rate), on both endpoints,
and a ShareGPT-format file the test writes itself. Checks the result JSON: every request completed,
exact input/output token totals, sane positive latencies, vLLM's key names.
Usage: serve_bench_smoke.py PATH/TO/cluster PATH/TO/serve_bench GOLDEN_DIR. Exit 77 = skipped."""
import json, os, re, signal, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model  # noqa: E402

cluster, bench, model = sys.argv[1], sys.argv[2], golden_model(sys.argv[3])
tmp = tempfile.mkdtemp(prefix="troupe-serve-bench-")


def run_bench(base, name, *args):
    out = os.path.join(tmp, name + ".json")
    cmd = [bench, "--base-url", base, "--model", "tiny", "--tokenizer", model, "--seed", "7",
           "--result-file", out, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    if p.returncode != 0:
        fail(f"{name}: serve_bench exited with {p.returncode}")
    if "Serving Benchmark Result" not in p.stdout or "Mean TTFT (ms):" not in p.stdout:
        fail(f"{name}: no vLLM-style summary table")
    with open(out) as f:
        return json.load(f)


def check(name, r, n, in_len=None, out_len=None, concurrency=None):
    for key in ("completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "duration", "input_lens",
                "output_lens", "ttfts", "itls", "errors"):
        if key not in r:
            fail(f"{name}: key {key} missing")
    for m in ("ttft", "tpot", "itl", "e2el"):
        for s in ("mean", "median", "p99", "std"):
            if f"{s}_{m}_ms" not in r:
                fail(f"{name}: key {s}_{m}_ms missing")
    if r["completed"] != n or any(r["errors"]):
        fail(f"{name}: completed {r['completed']} of {n}: {[e for e in r['errors'] if e][:3]}")
    if in_len is not None and r["total_input_tokens"] != n * in_len:
        fail(f"{name}: total_input_tokens {r['total_input_tokens']} != {n * in_len}")
    if out_len is not None and r["total_output_tokens"] != n * out_len:
        fail(f"{name}: total_output_tokens {r['total_output_tokens']} != {n * out_len}")
    if r["output_lens"] != [out_len] * n and out_len is not None:
        fail(f"{name}: output_lens {r['output_lens']}")
    for m in ("ttft", "tpot", "itl", "e2el"):
        mean, med, p99 = r[f"mean_{m}_ms"], r[f"median_{m}_ms"], r[f"p99_{m}_ms"]
        if not (0 < mean < 600_000 and 0 < med <= p99 < 600_000):
            fail(f"{name}: {m} mean {mean} median {med} p99 {p99}")
    if not r["mean_ttft_ms"] <= r["mean_e2el_ms"]:
        fail(f"{name}: TTFT above E2EL")
    if r["duration"] <= 0 or r["request_throughput"] <= 0:
        fail(f"{name}: duration {r['duration']}")
    if abs(r["request_throughput"] * r["duration"] - n) > 1e-6 * n:
        fail(f"{name}: request_throughput * duration != completed")
    if abs(r["output_throughput"] * r["duration"] - r["total_output_tokens"]) > 1e-3:
        fail(f"{name}: output_throughput inconsistent")
    if max(r["e2els"]) > r["duration"] + 1e-3:
        fail(f"{name}: a request outlasted the benchmark")
    if concurrency is not None and r["max_concurrent_requests"] > concurrency:
        fail(f"{name}: {r['max_concurrent_requests']} in flight above --max-concurrency {concurrency}")
    # ITLs per request: one gap per content chunk after the first, at most output_len - 1 of them.
    for itl, o in zip(r["itls"], r["output_lens"]):
        if len(itl) > max(o - 1, 0) or any(g < 0 for g in itl):
            fail(f"{name}: {len(itl)} ITLs for {o} output tokens")


# A ShareGPT-format file: conversations of human/gpt turns; one too short, one with a single turn.
words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jolly".split()
convs = []
for i in range(12):
    human = " ".join(words[(i + k) % len(words)] for k in range(6 + i))
    gpt = " ".join(words[(2 * i + k) % len(words)] for k in range(5 + i % 4))
    convs.append({"id": f"c{i}", "conversations": [{"from": "human", "value": human},
                                                   {"from": "gpt", "value": gpt}]})
convs.append({"id": "short", "conversations": [{"from": "human", "value": "hi"},
                                               {"from": "gpt", "value": "hello"}]})
convs.append({"id": "single", "conversations": [{"from": "human", "value": "only one turn here"}]})
sharegpt = os.path.join(tmp, "sharegpt.json")
with open(sharegpt, "w") as f:
    json.dump(convs, f)

yaml = os.path.join(tmp, "model.yaml")
with open(yaml, "w") as f:
    f.write(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: 256\nnum_kv_blocks: 128\n"
            "max_num_seqs: 8\nport: 0\n")
proc = subprocess.Popen([cluster, "serve", yaml, "--block"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
try:
    line = proc.stdout.readline()
    m = re.search(r"at (http://\S+)/v1", line)
    if not m:
        proc.kill()
        fail(f"no endpoint line: {line!r} {proc.stderr.read()}")
    base = m.group(1)
    rand = ["--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "12",
            "--ignore-eos"]
    check("c1", run_bench(base, "c1", *rand, "--num-prompts", "4", "--max-concurrency", "1"),
          4, 32, 12, concurrency=1)
    r = run_bench(base, "c4", *rand, "--num-prompts", "12", "--max-concurrency", "4")
    check("c4", r, 12, 32, 12, concurrency=4)
    if r["max_concurrent_requests"] < 2:
        fail("c4: requests never overlapped")
    check("chat-poisson",
          run_bench(base, "chat", *rand, "--endpoint", "/v1/chat/completions", "--num-prompts", "6",
                    "--request-rate", "20"), 6, 32, 12)
    # Goodput (vllm bench serve --goodput): the requests within every SLO, per second; counted
    # here again from the per-request times of the same result.
    r = run_bench(base, "goodput", *rand, "--num-prompts", "8", "--max-concurrency", "4",
                  "--goodput", "ttft:40", "e2el:400")
    good = sum(t * 1000 <= 40 and e * 1000 <= 400 for t, e in zip(r["ttfts"], r["e2els"]))
    if round(r["request_goodput"] * r["duration"]) != good:
        fail(f"goodput: {r['request_goodput']} req/s over {r['duration']} s, {good} good requests")
    r = run_bench(base, "goodput-loose", *rand, "--num-prompts", "4", "--goodput", "tpot:1e9")
    if abs(r["request_goodput"] - r["request_throughput"]) > 1e-9:
        fail(f"goodput-loose: {r['request_goodput']} != {r['request_throughput']}")
    p = subprocess.run([bench, "--base-url", base, "--model", "tiny", "--tokenizer", model,
                        "--goodput", "itl:5"], capture_output=True, text=True, timeout=60)
    if p.returncode != 2 or "--goodput takes KEY:MS" not in p.stderr:
        fail(f"goodput itl:5: rc={p.returncode} {p.stderr}")
    # Range ratio: input lengths vary within [16, 48], and each prompt re-encodes to its length.
    r = run_bench(base, "ratio", *rand, "--num-prompts", "8", "--random-range-ratio", "0.5",
                  "--max-concurrency", "4")
    check("ratio", r, 8, None, None)
    if not all(16 <= n <= 48 for n in r["input_lens"]) or len(set(r["input_lens"])) < 2:
        fail(f"ratio: input_lens {r['input_lens']}")
    # ShareGPT: 12 usable conversations; output lengths from the gpt turns' token counts.
    r = run_bench(base, "sharegpt", "--dataset-name", "sharegpt", "--dataset-path", sharegpt,
                  "--num-prompts", "10", "--max-concurrency", "4", "--ignore-eos")
    check("sharegpt", r, 10)
    if sum(r["output_lens"]) != r["total_output_tokens"] or min(r["output_lens"]) < 4:
        fail(f"sharegpt: output_lens {r['output_lens']}")
    if min(r["input_lens"]) < 6:
        fail(f"sharegpt: the too-short conversation was not filtered: {r['input_lens']}")
    # A server that is not there: every request fails, exit status 1, no crash.
    p = subprocess.run([bench, "--base-url", "http://127.0.0.1:1", "--model", "tiny", "--tokenizer",
                        model, "--num-prompts", "2", "--random-input-len", "8",
                        "--random-output-len", "4"], capture_output=True, text=True, timeout=120)
    if p.returncode != 1 or "all requests failed" not in p.stderr:
        fail(f"unreachable server: rc={p.returncode} {p.stderr}")
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
print("PASS")
