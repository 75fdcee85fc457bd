"""Hugging Face transformers reference for bench/cuda_bench: decode ms/step at batch 1 of a
random-weight Qwen3 model (static KV cache, compiled by generate()), 512-token prompt, same GPU.
Usage: python3 bench/hf_decode.py qwen3-0.6b qwen3-8b qwen3-30b-a3b"""
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=12288, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          tie_word_embeddings=False),
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
        moe = "num_experts" in SHAPES[name]
        config, causal_lm = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config,
                                                                               Qwen3ForCausalLM)
        cfg = config(vocab_size=151936, head_dim=128, max_position_embeddings=4096, rope_theta=1e6,
                     **SHAPES[name])
        torch.manual_seed(0)
        # Made in bf16 directly: the 30B-A3B shape would not fit the GPU in float32 first.
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = causal_lm(cfg).eval()
        torch.set_default_dtype(torch.float32)
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
