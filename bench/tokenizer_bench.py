"""Tokenizer benchmark: troupe vs Hugging Face `tokenizers`, single thread, same corpus, same run.

Builds a ~10 MB corpus of documents (English prose from the system's license and copyright texts,
C/C++ code from /usr/include, Chinese text made of the Qwen3 vocabulary's CJK words with Chinese
punctuation), then times single-thread encode of every document (best of 3) with HF (RAYON_NUM_THREADS=1)
and with troupe's tokenizer_bench, and prints MB/s and the ratio. Token counts must agree.
Usage: python bench/tokenizer_bench.py BUILD/bench/tokenizer_bench TOKENIZER_JSON [CORPUS_MB]
The corpus files are written beside the tool (tokenizer_corpus_*.jsonl); with TOKENIZER_BENCH_REUSE=1
existing ones are read instead (to time the same corpus on another machine).
"""
import glob
import json
import os
import random
import subprocess
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer  # noqa: E402


def read_files(patterns, limit):
    out, total = [], 0
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            try:
                text = open(path, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            out.append(text)
            total += len(text.encode())
            if total >= limit:
                return out
    return out


def chunks(texts, size, rng):
    docs = []
    for text in texts:
        for i in range(0, len(text), size):
            docs.append(text[i:i + size])
    rng.shuffle(docs)
    return docs


def chinese(vocab_path, limit, rng):
    vocab = json.load(open(vocab_path, encoding="utf-8"))["model"]["vocab"]
    words = []
    for token in vocab:
        try:
            raw = bytes(BYTE_DECODER[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if raw and all("\u4e00" <= ch <= "\u9fff" for ch in raw):
            words.append(raw)
    punct = ["，", "。", "、", "；", "：", "？", "！", "“", "”", "\n"]
    out, total = [], 0
    while total < limit:
        doc = "".join(rng.choice(words) + (rng.choice(punct) if rng.random() < 0.15 else "")
                      for _ in range(rng.randint(200, 600)))
        out.append(doc)
        total += len(doc.encode())
    return out


def byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = byte_decoder()


def main():
    tool, tokenizer_path = sys.argv[1], sys.argv[2]
    mb = float(sys.argv[3]) if len(sys.argv) > 3 else 10
    rng = random.Random(7)
    third = int(mb * 1e6 / 3)
    english = read_files(["/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"], third)
    code = read_files(["/usr/include/c++/**/*.h", "/usr/include/**/*.h"], third)
    parts = {"english": chunks(english, 3000, rng), "code": chunks(code, 3000, rng),
             "chinese": chinese(tokenizer_path, third, rng)}
    parts["all"] = [d for docs in parts.values() for d in docs]
    rng.shuffle(parts["all"])
    if os.environ.get("TOKENIZER_BENCH_REUSE") == "1":
        here = os.path.dirname(os.path.abspath(tool))
        for name in parts:
            with open(os.path.join(here, f"tokenizer_corpus_{name}.jsonl"), encoding="utf-8") as f:
                parts[name] = [json.loads(line) for line in f]
    hf = Tokenizer.from_file(tokenizer_path)
    status = 0
    print(f"tokenizer: {tokenizer_path}")
    for name, docs in parts.items():
        hf_mbs, ours_mbs, same = run_one(tool, tokenizer_path, hf, name, docs)
        total = sum(len(d.encode()) for d in docs)
        print(f"{name:8s} {len(docs):5d} docs {total / 1e6:6.2f} MB   HF {hf_mbs:6.2f} MB/s   "
              f"troupe {ours_mbs:6.2f} MB/s   ratio {ours_mbs / hf_mbs:5.2f}x   "
              f"{'tokens equal' if same else 'TOKEN COUNTS DIFFER'}")
        status |= not same
    return status


def run_one(tool, tokenizer_path, hf, name, docs):
    corpus = os.path.join(os.path.dirname(os.path.abspath(tool)), f"tokenizer_corpus_{name}.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:  # rewritten even when reused: same content
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    total = sum(len(d.encode()) for d in docs)
    best, hf_tokens = 1e30, 0
    for _ in range(3):
        t0 = time.perf_counter()
        hf_tokens = sum(len(hf.encode(d, add_special_tokens=False).ids) for d in docs)
        best = min(best, time.perf_counter() - t0)
    ours = json.loads(subprocess.run([tool, tokenizer_path, corpus], check=True,
                                     capture_output=True, text=True).stdout)
    return total / best / 1e6, ours["bytes"] / ours["seconds"] / 1e6, hf_tokens == ours["tokens"]


if __name__ == "__main__":
    sys.exit(main())
