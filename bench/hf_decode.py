"""Hugging Face transformers reference for bench/cuda_bench: decode ms/step at batch 1 of a
random-weight Qwen3 model (static KV cache, compiled by generate()), 512-token prompt, same GPU.
Usage: python3 bench/hf_decode.py qwen3-0.6b qwen3-8b"""
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=12288, tie_word_embeddings=False),
}


def timed_generate(model, prompt, new_tokens):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   cache_implementation="static")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    for name in sys.argv[1:] or SHAPES:
        cfg = Qwen3Config(vocab_size=151936, head_dim=128, max_position_embeddings=4096,
                          rope_theta=1e6, **SHAPES[name])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        prompt = torch.randint(0, 150000, (1, 512), device="cuda")
        # generate() compiles the decoding forward itself when the cache is static (transformers 5).
        for _ in range(2):  # compile and warm both shapes (prefill, decode)
            timed_generate(model, prompt, 8)
        short = min(timed_generate(model, prompt, 1) for _ in range(3))
        long = min(timed_generate(model, prompt, 129) for _ in range(3))
        print(f"{name}: HF transformers static cache + torch.compile (generate's own) "
              f"{(long - short) / 128 * 1e3:.2f} ms/step (batch 1, 512-token prompt)", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
