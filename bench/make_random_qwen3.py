"""Writes a random-weight Qwen3 model of a real shape as a Hugging Face folder (bf16 safetensors,
config.json) with the real Qwen3 tokenizer files, for serving benchmarks on a GPU machine.
qwen3-cpu-small (~100M parameters, most of them the tied embedding) is for CPU-rank benchmarks
(bench/cpu_disagg.sh); made on the GPU when there is one, else on the CPU.
Usage: python3 bench/make_random_qwen3.py qwen3-8b|qwen3-0.6b|qwen3-cpu-small OUT_DIR TOKENIZER_DIR"""
import os
import shutil
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_decode import SHAPES  # noqa: E402  (the same shapes as the decode benchmark)

SHAPES = dict(SHAPES, **{
    "qwen3-cpu-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=1536, tie_word_embeddings=True),
})


def main():
    name, out, tok = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = Qwen3Config(vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1e6, eos_token_id=151645, bos_token_id=151643, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(out, f))
    print(f"{name}: wrote {out}", flush=True)


if __name__ == "__main__":
    main()
