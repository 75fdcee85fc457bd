"""Shared by the serving test scripts: the golden model they serve (skipped with exit 77 when the
golden data is missing, failed under CI=true), FAIL and JSON POST helpers."""
import json, os, sys, urllib.request


def golden_model(golden_arg, name="tiny-qwen3"):
    """The golden model folder under $TROUPE_GOLDEN_DIR (or golden_arg); exits when missing."""
    golden = os.environ.get("TROUPE_GOLDEN_DIR", golden_arg)
    model = os.path.join(golden, "models", name)
    if not os.path.isfile(os.path.join(model, "config.json")):
        print(f"SKIP: golden data not found at {golden}")
        sys.exit(1 if os.environ.get("CI") == "true" else 77)
    return model


def fail(msg, cleanup=None):
    print("FAIL:", msg)
    if cleanup:
        cleanup()
    sys.exit(1)


def post(base, path, body, timeout=120):
    """(status, body text) of a JSON POST to base + path."""
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()
