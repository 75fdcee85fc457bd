"""Writes a random-weight Qwen3 model of a real shape as a Hugging Face folder (bf16 safetensors,
config.json) with the real Qwen3 tokenizer files, for serving benchmarks on a GPU machine.
Usage: python3 bench/make_random_qwen3.py qwen3-8b|qwen3-0.6b OUT_DIR TOKENIZER_DIR"""
import os
import shutil
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_decode import SHAPES  # noqa: E402  (the same shapes as the decode benchmark)


def main():
    name, out, tok = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = Qwen3Config(vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1e6, eos_token_id=151645, bos_token_id=151643, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(out, f))
    print(f"{name}: wrote {out}", flush=True)


if __name__ == "__main__":
    main()
