"""Compares troupe's tokenizer with Hugging Face `tokenizers` on a generated corpus.

Generates --count random strings (fixed seed: mixed scripts, emoji and ZWJ sequences, combining marks,
whitespace runs, digits, contractions, special-token look-alikes), encodes them with HF
(add_special_tokens=False) and with tokenizer_tool, and compares ids and decoded text (with and
without special tokens). The tool also reports whether streaming detokenization (token by token)
equals the full decode, and whether a stop string taken from the text stops the stream right before it. Any mismatch
prints the string; the exit status is 1 if there was one.
"""
import argparse
import json
import random
import subprocess
import sys
import unicodedata

from tokenizers import Tokenizer

WORDS = ["the", "The", "hello", "world", "don't", "I'M", "you'LL", "it's", "Qwen3", "llama",
         "tokenizer", "naïve", "café", "Ångström", "straße", "ﬁnance", "ǅ", "ſ"]
SCRIPTS = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0400, 0x04FF), (0x0600, 0x06FF),
           (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x0370, 0x03FF), (0x05D0, 0x05EA), (0x0300, 0x036F),
           (0x1F300, 0x1FAFF), (0x2000, 0x206F), (0x00A0, 0x017F), (0x10000, 0x1034F), (0xFF00, 0xFFEF)]
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\u00a0", "\u3000", "\u2028", "\x0b",
          "\x0c", "\x85", "\u200b", "\u2009", "\u180e", "\ufeff"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
           "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|reserved_special_token_7|>",
           "<|im_start", "im_end|>", "<|endoftext", "< |im_start| >", "<<|im_end|>>", "<|IM_START|>",
           "<think", "</think >"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "'s", "'t", "'re", "'ve", "'m", "'ll",
                                                     "'d", "'S", "'LL", "''", "->", "==", "**"]
EMOJI = ["😀", "🚀", "👨\u200d👩\u200d👧", "👍🏽", "🇨🇳", "❤️", "1️⃣", "🏳️\u200d🌈"]


def random_piece(rng):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(WORDS)
    if kind == 1:
        lo, hi = rng.choice(SCRIPTS)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))
    if kind == 2:
        return rng.choice(SPACES) * rng.randint(1, 3)
    if kind == 3:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
    if kind == 4:
        return rng.choice(SPECIAL)
    if kind == 5:
        return rng.choice(PUNCT)
    if kind == 6:
        return rng.choice(EMOJI)
    if kind == 7:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
                       for _ in range(rng.randint(1, 12)))
    # Any assigned code point. Unassigned ones (Cn in this Python's Unicode 14 tables) are left
    # out: their classes differ between Unicode versions (Oniguruma's vs PCRE2's tables).
    cp = rng.randint(0x20, 0x2FFFF)
    if 0xD800 <= cp <= 0xDFFF or unicodedata.category(chr(cp)) == "Cn":
        return ""
    return chr(cp)


def corpus(count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append("".join(random_piece(rng) for _ in range(rng.randint(1, 24))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    texts = corpus(args.count, args.seed)
    hf = Tokenizer.from_file(args.tokenizer)
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    run = subprocess.run([args.tool, args.tokenizer], input=stdin, capture_output=True, text=True,
                         errors="replace")
    if run.returncode != 0:
        print(run.stderr)
        return 1
    ours = [json.loads(line) for line in run.stdout.split("\n") if line]
    if len(ours) != len(texts):
        print(f"tool answered {len(ours)} lines for {len(texts)} strings")
        return 1
    bad = 0
    for text, mine in zip(texts, ours):
        ids = hf.encode(text, add_special_tokens=False).ids
        decoded = hf.decode(ids, skip_special_tokens=False)
        problems = []
        if mine.get("ids") != ids:
            problems.append(f"ids: hf {ids} troupe {mine.get('ids', mine.get('error'))}")
        if mine.get("decoded") != decoded:
            problems.append(f"decode: hf {decoded!r} troupe {mine.get('decoded')!r}")
        skipped = hf.decode(ids, skip_special_tokens=True)
        if mine.get("decoded_skip_special") != skipped:
            problems.append(f"decode(skip_special): hf {skipped!r} troupe {mine.get('decoded_skip_special')!r}")
        if not mine.get("stream_ok"):
            problems.append("streaming detokenization differs from the full decode")
        if not mine.get("stop_ok"):
            problems.append("streaming with a stop string from the text did not stop right before it")
        if problems:
            bad += 1
            if bad <= 20:
                print(f"MISMATCH {text!r}\n  " + "\n  ".join(problems))
    name = args.tokenizer
    print(f"{name}: {len(texts)} strings, {bad} mismatches (seed {args.seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
