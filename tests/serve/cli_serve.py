#!/usr/bin/env python3
"""`cluster serve TARGET [flags]` from the command line, as a user types it: typos answered with
the closest command or option, exit codes (README: Exit codes), a Hugging Face id that is not in
the cache (the message names where it looked), flag errors naming the flag; then, on the golden
tiny-qwen3 model, a folder served directly with `device: auto` (CPU here unless a GPU is seen),
flags overriding model.yaml, and an HF id resolved from a local cache laid out as the hub does.
Usage: cli_serve.py PATH/TO/cluster GOLDEN_DIR. Exit 77 = the golden part skipped."""
import json, os, re, signal, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail  # noqa: E402

cluster, golden_arg = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp(prefix="troupe-cli-")
env = dict(os.environ, HF_HOME=os.path.join(tmp, "hf"), TROUPE_TEMP_DIR=os.path.join(tmp, "t"))
env.pop("HF_HUB_CACHE", None)


def run(*args, timeout=60):
    p = subprocess.run([cluster, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def expect(args, rc, needle):
    got_rc, out, err = run(*args)
    if got_rc != rc or needle not in err + out:
        fail(f"cluster {' '.join(args)}: rc={got_rc} (want {rc}), {needle!r} not in {err + out!r}")


# Typos, usage errors and exit codes: no model needed.
expect(["serv", "m.yaml"], 2, "unknown command 'serv' (did you mean 'serve'?)")
expect([], 2, "A subcommand is required")
expect(["--version"], 0, ".")
expect(["serve", "--help"], 0, "--tensor-parallel-size")
expect(["serve", "x.gguf", "--tensor-paralel-size", "2"], 2,
       "unknown option '--tensor-paralel-size' for `cluster serve` (did you mean "
       "'--tensor-parallel-size'?)")
expect(["serve", "/nonexistent/model.yaml", "--block"], 2, "cannot read the deployment file")
expect(["serve", "/nonexistent/folder", "--block"], 2, "does not exist")
hub = os.path.join(tmp, "hf", "hub")
expect(["serve", "NoOrg/no-model", "--block"], 2,
       f"{hub}/models--NoOrg--no-model/snapshots does not exist")
expect(["serve", "/nonexistent/folder", "--max-num-seqs", "0"], 2,
       "--max-num-seqs: 'max_num_seqs' must be >= 1")
expect(["serve", "/nonexistent/folder", "--device", "tpu"], 2,
       "--device: 'device' must be auto, cpu or cuda")
expect(["serve", "/nonexistent/folder", "--port", "eighty"], 2, "'port' has an invalid value")
expect(["serve", "--help"], 0, "--enable-expert-parallel")
expect(["serve", "/nonexistent/folder", "--tensor-parallel-size", "2", "--expert-parallel-size",
        "4"], 2, "--expert: 'parallel.expert' must be in [1, parallel.tensor]")
expect(["serve", "/nonexistent/folder", "--enable-expert-parallel", "--expert-parallel-size", "2"],
       2, "--expert excludes --enable-expert-parallel")
print("typos, usage errors and exit codes: ok")

golden = os.environ.get("TROUPE_GOLDEN_DIR", golden_arg)
model = os.path.join(golden, "models", "tiny-qwen3")
if not os.path.isfile(os.path.join(model, "config.json")):
    print(f"SKIP: golden data not found at {golden}")
    sys.exit(1 if os.environ.get("CI") == "true" else 77)


def serve(*args):
    return subprocess.Popen([cluster, "serve", *args, "--block"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def endpoint(proc):
    line = proc.stdout.readline()
    m = re.search(r"at (http://\S+)/v1 \((\w+),", line)
    if not m:
        proc.kill()
        fail(f"no endpoint line: {line!r} {proc.stderr.read()}")
    return m.group(1), m.group(2)


def models(base):
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]


def load_lines(err, name):
    """The load progress lines of `name` on stderr (not a terminal): (verb, replica, percent)."""
    return [(v, int(r), int(p)) for v, r, p in re.findall(
        rf"(loading|loaded) '{re.escape(name)}' replica (\d+) rank 0 \(pp 0, tp 0\): (\d+)%", err)]


def check_load_lines(lines, replica, what):
    mine = [(v, p) for v, r, p in lines if r == replica]
    if not mine or mine[0][1] != 0 or mine[-1] != ("loaded", 100) or \
            any(b[1] < a[1] for a, b in zip(mine, mine[1:])):
        fail(f"{what}: replica {replica}'s load progress lines go {mine}")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("no exit within 60 s of SIGTERM")
    err = proc.stderr.read()
    if rc != 0:
        fail(f"exit {rc} after SIGTERM: {err}")
    return err


# A folder, served directly: the folder's name, device auto, flags as vLLM spells them.
proc = serve(model, "--port", "0", "--max-model-len", "128", "--num-gpu-blocks-override", "32")
base, device = endpoint(proc)
m = models(base)
err = stop(proc)
if m["id"] != "tiny-qwen3" or m["max_model_len"] != 128:
    fail(f"folder served as {m}")
if f"device: auto -> {device}" not in err:
    fail(f"device auto not reported: {err!r}")
check_load_lines(load_lines(err, "tiny-qwen3"), 0, "--block")
print(f"folder: served as {m['id']} on {device} (device: auto), load progress from 0% to 100%")

# Flags override model.yaml; what the flags leave alone comes from the file.
yaml = os.path.join(tmp, "model.yaml")
with open(yaml, "w") as f:
    f.write(f"model: {model}\nserved_model_name: from-yaml\nmax_model_len: 256\n"
            "num_kv_blocks: 64\nport: 1\ndevice: cpu\n")
proc = serve(yaml, "--port", "0", "--max_model_len", "64")
base, device = endpoint(proc)
m = models(base)
stop(proc)
if m["id"] != "from-yaml" or m["max_model_len"] != 64 or device != "cpu":
    fail(f"yaml + flags served {m} on {device}")
print("model.yaml + flags: flags win, the file fills the rest")

# Two replicas in this process, JSON logs: each replica's load progress as JSON lines.
proc = serve(yaml, "--port", "0", "--data-parallel-size", "2", "--log-format", "json")
endpoint(proc)
err = stop(proc)
msgs = []
for line in err.splitlines():
    try:
        msgs.append(json.loads(line)["msg"])
    except (ValueError, KeyError):
        fail(f"--log-format json: a stderr line that is not a JSON log object: {line!r}")
lines = load_lines("\n".join(msgs), "from-yaml")
for replica in (0, 1):
    check_load_lines(lines, replica, "--log-format json, replicas 2")
print("two replicas, JSON logs: each replica's load progress from 0% to 100%")

# An HF id from the cache, laid out as huggingface_hub does (blobs linked from a snapshot).
repo = os.path.join(hub, "models--troupe-test--tiny-qwen3")
snap = os.path.join(repo, "snapshots", "0123abcd")
os.makedirs(snap)
os.makedirs(os.path.join(repo, "refs"))
with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write("0123abcd")
for name in os.listdir(model):
    target = os.path.join(model, name)
    if os.path.getsize(target) < 1024:  # the golden data's stubs name a shared file: follow them
        with open(target) as f:
            text = f.read().strip()
        if text and text[0] not in "{[" and os.path.isfile(os.path.join(model, text)):
            target = os.path.normpath(os.path.join(model, text))
    os.symlink(target, os.path.join(snap, name))
proc = serve("troupe-test/tiny-qwen3", "--port", "0", "--max-model-len", "128",
             "--num-kv-blocks", "32", "--device", "cpu")
base, device = endpoint(proc)
m = models(base)
stop(proc)
if m["id"] != "troupe-test/tiny-qwen3":
    fail(f"HF id served as {m}")
print("HF id from the local cache: ok")
print("PASS")
