#!/usr/bin/env python3
"""End to end on the GPU: `cluster serve model.yaml --block` with device: cuda on the golden
tiny-qwen3 model (bf16 CUDA backend + GPU sampler), raw HTTP through urllib: a greedy chat request
equals `cluster generate --device cuda` on the same prompt ids, a sampled completion with a seed
and logprobs is reproducible, echo with logprobs scores the prompt, sampled structured output (a JSON schema) parses and matches, and
dtype: float32 is refused for cuda. Without a usable GPU the
server must refuse with a clear reason, and the test skips (exit 77).
Usage: serve_cuda_e2e.py PATH/TO/cluster GOLDEN_DIR."""
import json, math, os, re, signal, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model, post  # noqa: E402

cluster, model = sys.argv[1], golden_model(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="troupe-serve-cuda-")


def post_json(base, path, body):
    return json.loads(post(base, path, body)[1])


def serve(yaml_text):
    path = os.path.join(tmp, "model.yaml")
    with open(path, "w") as f:
        f.write(yaml_text)
    return subprocess.Popen([cluster, "serve", path, "--block"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


p = serve(f"model: {model}\ndevice: cuda\ndtype: float32\nport: 0\n")
out, err = p.communicate(timeout=60)
if p.returncode == 0 or "bfloat16" not in err:
    fail(f"dtype float32 on cuda: rc={p.returncode} {err!r}")

proc = serve(f"model: {model}\ndevice: cuda\nserved_model_name: tiny\nmax_model_len: 256\n"
             "gpu_memory_utilization: 0.5\nport: 0\n")
line = proc.stdout.readline()  # the endpoint once listening, or nothing when start failed
m = re.search(r"at (http://\S+)/v1", line)
if not m:
    proc.kill()
    err = proc.stderr.read()
    if "device: cuda cannot run here" in err:
        print("SKIP: no usable GPU; the server said:", err.strip().splitlines()[-1])
        sys.exit(77)
    fail(f"no endpoint line: {line!r} {err}")
base = m.group(1)
try:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    j = post_json(base, "/v1/chat/completions",
                  {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True})
    ids = j["choices"][0]["token_ids"]
    gen = subprocess.run([cluster, "generate", "--device", "cuda", "--model", model,
                          "--max-tokens", "8", "--ignore-eos",
                          "--prompt-ids", ",".join(map(str, j["prompt_token_ids"]))],
                         capture_output=True, text=True, timeout=300)
    got = re.search(r"^generated ids: (.*)$", gen.stdout, re.M)
    if not got:
        fail(f"cluster generate --device cuda: {gen.stdout!r} {gen.stderr!r}")
    if ",".join(map(str, ids)) != got.group(1):
        fail(f"HTTP greedy on cuda {ids} != cluster generate --device cuda {got.group(1)}")
    print("chat greedy (cuda) == cluster generate --device cuda:", ids)

    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12,
            "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1234, "logprobs": 3,
            "ignore_eos": True, "frequency_penalty": 0.3}
    a = post_json(base, "/v1/completions", body)
    b = post_json(base, "/v1/completions", body)
    ca, cb = a["choices"][0], b["choices"][0]
    if ca["text"] != cb["text"]:
        fail(f"same seed, different completions: {ca['text']!r} vs {cb['text']!r}")
    lp = ca["logprobs"]
    if len(lp["token_logprobs"]) != 12 or any(not (x <= 0 and math.isfinite(x))
                                               for x in lp["token_logprobs"]):
        fail(f"logprobs: {lp}")
    if any(not 1 <= len(t) <= 3 for t in lp["top_logprobs"]):  # keyed by text: may merge
        fail(f"top_logprobs: {lp['top_logprobs']}")
    if a["usage"]["completion_tokens"] != 12:
        fail(f"usage: {a['usage']}")
    print("completion (cuda, sampled, seed 1234):", repr(ca["text"]))

    # Prompt logprobs (lm-eval's loglikelihood shape): every prompt row's logits scored on the
    # host, the first token without one; the sampled token as the GPU sampler picks it greedily.
    plain = post_json(base, "/v1/completions", {"model": "tiny", "prompt": "The capital of France is",
                                                 "max_tokens": 1, "temperature": 0, "logprobs": 1})
    echo = post_json(base, "/v1/completions", {"model": "tiny", "prompt": "The capital of France is",
                                                "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                                "echo": True})
    lp = echo["choices"][0]["logprobs"]
    n_prompt = echo["usage"]["prompt_tokens"]
    if len(lp["token_logprobs"]) != n_prompt + 1 or lp["token_logprobs"][0] is not None or \
            any(not (x <= 0 and math.isfinite(x)) for x in lp["token_logprobs"][1:]):
        fail(f"echo with logprobs on cuda: {lp}")
    if lp["tokens"][-1] != plain["choices"][0]["logprobs"]["tokens"][0] or \
            abs(lp["token_logprobs"][-1] - plain["choices"][0]["logprobs"]["token_logprobs"][0]) > 0.05:
        fail(f"echo's generated token differs from the plain request's: {lp} vs {plain}")
    print("prompt logprobs (cuda):", [round(x, 3) for x in lp["token_logprobs"][1:]])

    # Structured output on the GPU sampler: sampled JSON that parses and has the schema's keys.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    for seed in range(3):
        s = post_json(base, "/v1/chat/completions",
                      {"model": "tiny", "messages": msgs, "max_tokens": 60, "temperature": 1.0,
                       "seed": seed, "response_format": {"type": "json_schema", "json_schema": {
                           "name": "answer", "schema": schema, "strict": True}}})
        text = s["choices"][0]["message"]["content"]
        try:
            obj = json.loads(text)
        except ValueError:
            fail(f"structured output on cuda is not JSON: {text!r}")
        if sorted(obj) != ["city", "sunny"] or not isinstance(obj["sunny"], bool) or \
                not isinstance(obj["city"], str) or len(obj["city"]) > 12:
            fail(f"structured output on cuda does not match its schema: {text!r}")
    print("structured output (cuda, sampled):", text)
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("server did not stop within 30 s of SIGTERM")
if rc != 0:
    fail(f"server exited with {rc}: {proc.stderr.read()}")
print("PASS")
