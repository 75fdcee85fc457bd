#!/usr/bin/env python3
"""`cluster` starts and serves on CPU with no CUDA library reachable. Checks that the binary has no
NEEDED entry for a CUDA library (the CUDA backend is the plugin ../lib/libtroupe_cuda.so, loaded
on first use), then hides every CUDA library this machine has (the CUDA runtime, cuBLAS(Lt), NCCL
and the driver's libcuda, wherever the loader could find them: ld.so.cache, LD_LIBRARY_PATH, the
plugin's RUNPATH) inside a user + mount namespace (`unshare -rm`: a tmpfs over each directory
holding them, /dev/null over the files in system directories), and in there:
  - `cluster generate` on CPU gives the same tokens as outside;
  - `cluster generate --device cuda` fails naming the missing library (or "built without CUDA");
  - `cluster serve --block` with device: auto picks the CPU, says why, and answers a completion.
Runs on a bundle's bin/cluster as well as on the build tree's. Skips (77) when CUDA libraries exist
but no namespace can be made to hide them. Usage: no_cuda.py PATH/TO/cluster GOLDEN_DIR."""
import glob, os, re, shutil, signal, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_util import fail, golden_model, post  # noqa: E402

cluster, model = os.path.abspath(sys.argv[1]), os.path.abspath(golden_model(sys.argv[2]))
CUDA_LIB = re.compile(r"^lib(cudart|cublasLt|cublas|nccl|cuda)\.so")
plugin = os.path.join(os.path.dirname(os.path.dirname(cluster)), "lib", "libtroupe_cuda.so")
with_cuda = os.path.isfile(plugin)

# 1. No CUDA library among the binary's own dependencies.
dyn = subprocess.run(["readelf", "-d", cluster], capture_output=True, text=True, check=True).stdout
needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", dyn)
if any(CUDA_LIB.match(n) for n in needed):
    fail(f"{cluster} links CUDA directly: NEEDED {needed}")
print(f"NEEDED: {' '.join(needed)}")
print(f"CUDA plugin: {plugin if with_cuda else 'none (a build without CUDA)'}")


# 2. Where the loader could find a CUDA library on this machine.
def cuda_files():
    files = set()
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    cache = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    for m in re.finditer(r"^\s*(\S+) .*=> (\S+)$", cache, re.M):
        if CUDA_LIB.match(m.group(1)):
            files.add(m.group(2))
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += ["/usr/local/cuda/lib", "/usr/local/cuda/lib64", "/usr/local/cuda/targets"]
    if with_cuda:  # the plugin's RUNPATH (a build tree's names the toolkit's lib directory)
        dyn = subprocess.run(["readelf", "-d", plugin], capture_output=True, text=True).stdout
        for m in re.finditer(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*?)\]", dyn):
            dirs += [d.replace("$ORIGIN", os.path.dirname(plugin)) for d in m.group(1).split(":")]
    for d in dirs:
        for f in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True):
            if CUDA_LIB.match(os.path.basename(f)):
                files.add(f)
    return sorted({os.path.realpath(f) for f in files if os.path.exists(f)} | files)


SYSTEM_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
files = cuda_files()
hide_dirs = sorted({os.path.dirname(os.path.realpath(f)) for f in files
                    if not os.path.dirname(os.path.realpath(f)).startswith(SYSTEM_DIRS)})
hide_dirs = [d for d in hide_dirs if not any(d.startswith(p + "/") for p in hide_dirs)]
hide_files = sorted({f for f in files if os.path.dirname(os.path.realpath(f)).startswith(SYSTEM_DIRS)})
if any(os.path.dirname(cluster).startswith(d) or model.startswith(d) for d in hide_dirs):
    fail(f"the binary or the model lies in a CUDA library directory: {hide_dirs}")
script = "set -e\n"
for d in hide_dirs:
    script += f"mount -t tmpfs none '{d}'\n"
for f in hide_files:
    script += f"mount --bind /dev/null '{f}'\n"
script += "exec env -u LD_LIBRARY_PATH \"$@\"\n"
print(f"hiding: tmpfs over {hide_dirs or 'nothing'}, /dev/null over {hide_files or 'nothing'}")


def hidden(args):
    if not files:  # nothing to hide (a machine without CUDA): no namespace needed
        return ["env", "-u", "LD_LIBRARY_PATH"] + args
    return ["unshare", "-rm", "sh", "-c", script, "sh"] + args


if files:  # prove the hiding works before running cluster: no CUDA library file left readable
    ns = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if ns.returncode != 0:
        print(f"SKIP: no user + mount namespace to hide CUDA in: {ns.stderr.strip()}")
        sys.exit(77)
    probe = subprocess.run(hidden(["sh", "-c", 'for f; do [ ! -s "$f" ] || echo "$f"; done', "sh"]
                                  + files), capture_output=True, text=True)
    if probe.returncode != 0:
        fail(f"hiding CUDA failed: {probe.stderr.strip()}")
    if probe.stdout.strip():
        fail(f"still readable in the namespace: {probe.stdout.split()}")

ids = "9707,11,1879,0"
gen = [cluster, "generate", "--model", model, "--prompt-ids", ids, "--max-tokens", "4",
       "--ignore-eos"]


def run(args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    shown = args[args.index(cluster):]
    print(f"$ {'(CUDA hidden) ' if args[0] == 'unshare' else ''}{' '.join(shown)}\n"
          f"  rc={r.returncode}\n  {r.stdout.strip()}\n  {r.stderr.strip()}")
    return r


# 3. CPU generation, hidden and not.
want = run(gen)
got = run(hidden(gen))
ids_re = re.compile(r"^generated ids: (.*)$", re.M)
if want.returncode != 0 or not ids_re.search(want.stdout):
    fail("cluster generate on CPU (CUDA visible) failed")
if got.returncode != 0 or not ids_re.search(got.stdout):
    fail("cluster generate on CPU with CUDA hidden failed")
if ids_re.search(got.stdout).group(1) != ids_re.search(want.stdout).group(1):
    fail("CPU tokens differ with CUDA hidden")

# 4. device: cuda says why it cannot run.
cuda = run(hidden(gen + ["--device", "cuda"]))
reason = re.compile(r"lib(cudart|cublasLt|cublas|nccl)\S*: (cannot open shared object file|file too short)"
                    if with_cuda and files else
                    r"libtroupe_cuda\.so|lib(cudart|cublasLt|cublas|nccl)" if with_cuda else
                    r"built without CUDA")
if cuda.returncode == 0 or "device: cuda cannot run here" not in cuda.stderr \
        or not reason.search(cuda.stderr):
    fail(f"--device cuda with CUDA hidden: expected an error matching {reason.pattern!r}")

# 5. serve --block, device: auto: CPU, with the reason in the log; a completion is answered.
tmp = tempfile.mkdtemp(prefix="troupe-no-cuda-")
with open(os.path.join(tmp, "model.yaml"), "w") as f:
    f.write(f"model: {model}\ndevice: auto\nserved_model_name: tiny\nmax_model_len: 128\n"
            "port: 0\n")
log = open(os.path.join(tmp, "serve.log"), "w+")
proc = subprocess.Popen(hidden([cluster, "serve", os.path.join(tmp, "model.yaml"), "--block"]),
                        stdout=subprocess.PIPE, stderr=log, text=True)


def stop():
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


line = proc.stdout.readline()
log.seek(0)
err = log.read()
m = re.search(r"at (http://\S+)/v1", line)
if not m:
    fail(f"serve with CUDA hidden did not start: {line!r} {err}", stop)
auto = re.search(r"device: auto -> (\S+) \((.*)\)", err)
print("serve:", auto.group(0) if auto else err)
if not auto or auto.group(1) != "cpu" or not reason.search(auto.group(2)):
    fail(f"device: auto should pick cpu saying why (matching {reason.pattern!r})", stop)
status, body = post(m.group(1), "/v1/completions",
                    {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
if status != 200 or '"text"' not in body:
    fail(f"completion: {status} {body}", stop)
print("completion with CUDA hidden:", body[:200])
stop()
print("OK: cluster runs and serves on CPU without CUDA libraries")
