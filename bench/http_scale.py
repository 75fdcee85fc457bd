#!/usr/bin/env python3
"""The HTTP front end at scale, on the golden tiny-qwen3 model served by `cluster serve --block`:
  1. N concurrent streaming completions (default 2,000), each checked token for token against
     the golden greedy output of its prompt;
  2. M idle connections held open (default 10,000) while new requests are still served.
Prints the server's thread count and RSS (sampled through /proc) in each phase, as a table and
as JSON (--json FILE). Raises the open-file limit (soft -> hard) for itself and the server.
Usage: http_scale.py PATH/TO/cluster GOLDEN_DIR [--streams N] [--idle M] [--tokens T] [--json F]"""
import argparse, asyncio, json, os, re, resource, signal, subprocess, sys, tempfile, time


def proc_status(pid):
    """(threads, RSS MiB) of a process."""
    with open(f"/proc/{pid}/status") as f:
        s = f.read()
    threads = int(re.search(r"^Threads:\s+(\d+)", s, re.M).group(1))
    rss = int(re.search(r"^VmRSS:\s+(\d+)", s, re.M).group(1)) / 1024
    return threads, rss


class sampler:
    """Samples the server's threads and RSS every 0.2 s while a phase runs."""

    def __init__(self, pid):
        self.pid, self.threads, self.rss, self.task = pid, [], [], None

    async def run(self):
        while True:
            t, r = proc_status(self.pid)
            self.threads.append(t)
            self.rss.append(r)
            await asyncio.sleep(0.2)

    def __enter__(self):
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *exc):
        self.task.cancel()

    def summary(self):
        return {"threads_min": min(self.threads), "threads_max": max(self.threads),
                "rss_mib_min": round(min(self.rss), 1), "rss_mib_max": round(max(self.rss), 1)}


def request_bytes(body, keep_alive=False):
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{'' if keep_alive else 'Connection: close'}\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


async def completion(port, prompt, tokens, stream):
    """(HTTP status, generated token ids) of one greedy completion; reads to EOF."""
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    w.write(request_bytes({"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True, "stream": stream}))
    await w.drain()
    raw = await r.read()
    w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head[9:12]) if len(head) >= 12 else 0
    if status != 200:
        return status, []
    if not stream:
        return status, json.loads(body)["choices"][0]["token_ids"]
    ids, done = [], False
    for line in body.decode().split("\n\n"):
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            ids += json.loads(line[6:])["choices"][0].get("token_ids", [])
    return (status if done else -1), ids if done else body[-300:]


async def streams_phase(port, pid, cases, n, tokens):
    with sampler(pid) as s:
        t0 = time.monotonic()
        jobs = [completion(port, cases[i % len(cases)][0], tokens, True) for i in range(n)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        wall = time.monotonic() - t0
    right = sum(1 for i, r in enumerate(results) if not isinstance(r, BaseException) and
                r[0] == 200 and r[1] == cases[i % len(cases)][1][:tokens])
    errors = [repr(r) if isinstance(r, BaseException) else (r[0], str(r[1])) for r in results
              if isinstance(r, BaseException) or r[0] != 200][:5]
    return {"requests": n, "right_tokens": right, "wall_s": round(wall, 1),
            "output_tok_per_s": round(n * tokens / wall, 1), "errors": errors, **s.summary()}


async def idle_phase(port, pid, cases, m, tokens):
    held = []
    with sampler(pid) as s:
        t0 = time.monotonic()
        for start in range(0, m, 500):
            held += await asyncio.gather(*[asyncio.open_connection("127.0.0.1", port)
                                           for _ in range(min(500, m - start))])
        opened = time.monotonic() - t0
        await asyncio.sleep(1.0)  # every one accepted and waiting in the server
        t1 = time.monotonic()
        served = await asyncio.gather(*[completion(port, cases[i % len(cases)][0], tokens, False)
                                        for i in range(20)])
        serve_s = time.monotonic() - t1
        await asyncio.sleep(1.0)
        # Still open: none of them was closed under us (an EOF would be readable now).
        alive = sum(1 for r, _ in held if not r.at_eof() and not r._buffer)
    right = sum(1 for i, (st, ids) in enumerate(served)
                if st == 200 and ids == cases[i % len(cases)][1][:tokens])
    for _, w in held:
        w.close()
    return {"idle_connections": m, "still_open": alive, "open_s": round(opened, 1),
            "requests_during": 20, "right_tokens": right, "requests_wall_s": round(serve_s, 2),
            **s.summary()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cluster")
    ap.add_argument("golden")
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    print(f"ulimit -n: {soft} -> {hard}")
    if hard < a.idle + 256:
        sys.exit(f"the hard open-file limit {hard} is below {a.idle} idle connections + 256")
    model = os.path.join(a.golden, "models", "tiny-qwen3")
    golden = json.load(open(os.path.join(model, "golden.json")))
    cases = [(c["prompt_ids"], c["greedy_24"]) for c in golden["cases"]]
    tmp = tempfile.mkdtemp(prefix="troupe-http-scale-")
    yaml = os.path.join(tmp, "model.yaml")
    with open(yaml, "w") as f:
        f.write(f"model: {model}\nserved_model_name: tiny\nmax_model_len: 256\n"
                f"max_num_seqs: 256\nnum_kv_blocks: 2560\nmax_num_batched_tokens: 4096\n"
                f"max_waiting: {a.streams + 64}\nport: 0\n"
                f"http: {{threads: 2, max_connections: {a.idle + 512}, idle_timeout_s: 900}}\n")
    log = open(os.path.join(tmp, "server.log"), "w")
    print(f"server log: {log.name}")
    server = subprocess.Popen([a.cluster, "serve", yaml, "--block"], stdout=subprocess.PIPE,
                              stderr=log, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"at http://[\d.]+:(\d+)/v1", line)
        if not m:
            sys.exit(f"no endpoint line: {line!r}")
        port = int(m.group(1))
        threads0, rss0 = proc_status(server.pid)
        out = {"start": {"threads": threads0, "rss_mib": round(rss0, 1)}}
        out["streams"] = asyncio.run(streams_phase(port, server.pid, cases, a.streams, a.tokens))
        out["idle"] = asyncio.run(idle_phase(port, server.pid, cases, a.idle, a.tokens))
        threads1, rss1 = proc_status(server.pid)
        names = sorted(open(f"/proc/{server.pid}/task/{t}/comm").read().strip()
                       for t in os.listdir(f"/proc/{server.pid}/task"))
        out["end"] = {"threads": threads1, "rss_mib": round(rss1, 1), "thread_names": names}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    s, i = out["streams"], out["idle"]
    ok = (s["right_tokens"] == a.streams and i["right_tokens"] == 20 and i["still_open"] == a.idle)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
