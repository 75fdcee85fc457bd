// CUDA kernels of the bf16 backend, behind host launchers that enqueue on a stream and return the
// launch error. Called by cuda_backend.cu, and by the GPU tests against the CPU reference.
// All pointers are device pointers; row-major layouts; shapes in comments.
#pragma once

#include "engine/backend/cuda/cuda_common.cuh"

namespace troupe::engine::cuda {

struct head_layout {
  int num_heads = 0; // query heads
  int num_kv_heads = 0;
  int head_dim = 0;
  TROUPE_HOST_DEVICE int qkv_width() const { return (num_heads + 2 * num_kv_heads) * head_dim; }
};

// resid[T, H] = float(table[tokens[t] - vocab_begin, :]) for tokens in this rank's vocabulary
// slice [vocab_begin, vocab_begin + vocab_rows), else 0 (vocab-parallel embedding).
expected<void> embed(const int32_t* tokens, int T, const bf16* table, int H, float* resid,
                     cudaStream_t s, int vocab_begin = 0, int vocab_rows = 0x7fffffff);
// out[T, H] = rmsnorm(x) * w
expected<void> rms_norm(const float* x, int T, int H, const float* w, float eps, bf16* out,
                        cudaStream_t s);
// resid[T, H] += delta (+ bias[H] when non-null); out = rmsnorm(resid) * w
expected<void> add_rms_norm(float* resid, const bf16* delta, const bf16* bias, int T, int H,
                            const float* w, float eps, bf16* out, cudaStream_t s);
// out[R, H] = rmsnorm(resid[src_rows[r]]) * w: the final norm for the rows that need logits.
expected<void> gather_rms_norm(const float* resid, const int32_t* src_rows, int R, int H,
                               const float* w, float eps, bf16* out, cudaStream_t s);
// On qkv[T, (nh + 2 nkv) * D] in place: add bias (optional), RMSNorm each q and k head (optional,
// Qwen3), rotate q and k by RoPE at positions[t], and store k and v into the paged caches at
// slot slots[t] ([num_slots, nkv, D]).
expected<void> qkv_rope_cache(bf16* qkv, const bf16* bias, const float* q_norm, const float* k_norm,
                              float eps, const int32_t* positions, const int32_t* slots,
                              const float* inv_freq, int T, head_layout L, bf16* k_cache,
                              bf16* v_cache, cudaStream_t s);
// out[T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
expected<void> silu_mul(const bf16* gate_up, int T, int I, bf16* out, cudaStream_t s);
// out[r] = argmax(logits[r, :V]) (lowest id on ties)
expected<void> argmax_rows(const float* logits, int R, int V, int32_t* out, cudaStream_t s);

// Paged causal attention for T query tokens of any mix of sequences. Token t of sequence
// token_seq[t] at position positions[t] attends keys 0..positions[t] found through its row of
// block_tables [S, max_blocks]. Each token's context is divided evenly into num_splits shares,
// processed in parallel (split-K) and combined; partial buffers hold T * nh * num_splits * (D + 2)
// floats. Requires head_dim % 8 == 0, head_dim <= 256, at most 8 query heads per kv head.
struct attention_args {
  const bf16* qkv = nullptr; // queries: the first nh * D columns of each qkv row
  const bf16* k_cache = nullptr;
  const bf16* v_cache = nullptr;
  const int32_t* token_seq = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* block_tables = nullptr;
  int max_blocks = 0;
  int block_size = 0;
  int T = 0;
  int num_splits = 1;
  float scale = 1.0f;
  float* partial = nullptr;
  bf16* out = nullptr; // [T, nh * D]
  // Optional routing (route_attention): flash tiles [num_flash_tiles, 3] = (sequence index, first
  // token, token count), consecutive tokens of one sequence, at most flash_tile_tokens(L) each,
  // run whole on tensor cores; every other token is listed in split_tokens and runs split-K
  // (num_splits shares of its context, then combined): on tensor cores too when decode_tiles
  // [num_split_tokens, 3] is set, else on the CUDA-core kernel. With split_tokens null, all T
  // tokens take the CUDA-core split-K path.
  const int32_t* flash_tiles = nullptr;
  int num_flash_tiles = 0;
  const int32_t* split_tokens = nullptr;
  int num_split_tokens = 0;
  const int32_t* decode_tiles = nullptr;
};
expected<void> paged_attention(const attention_args& a, head_layout L, cudaStream_t s);
// The tensor-core kernel behind paged_attention's flash tiles (decode = false) and decode tiles
// (decode = true, split-K) in flash_prefill.cu: head_dim 16, 32, 64 or 128; a flash tile holds at
// most flash_tile_tokens(L) = 64 / (query heads per kv head) tokens.
bool flash_prefill_supported(head_layout L);
int flash_tile_tokens(head_layout L);
expected<void> flash_attention(const attention_args& a, head_layout L, bool decode, cudaStream_t s);
// Host side: routes a step's sequences (seq_tokens[i] query tokens each, consecutive in the step).
// Sequences with at least min_tokens tokens become flash tiles (when the head layout is
// supported); the others' tokens go to split_tokens, each also as a one-token decode tile.
// tiles and decode_tiles need room for 3 * T ints, split_tokens for T. Sets a.num_flash_tiles
// and a.num_split_tokens (not the pointers).
void route_attention(const int* seq_tokens, int num_seqs, head_layout L, int min_tokens,
                     int32_t* tiles, int32_t* split_tokens, int32_t* decode_tiles,
                     attention_args& a);
size_t attention_partial_floats(int T, head_layout L, int num_splits);

// Fills n bf16 values with a deterministic pseudo-random uniform(-scale, scale) sequence.
expected<void> fill_random(bf16* dst, size_t n, float scale, uint64_t seed, cudaStream_t s);
expected<void> fill_value(float* dst, size_t n, float value, cudaStream_t s);
expected<void> f32_to_bf16(const float* src, size_t n, bf16* dst, cudaStream_t s);

} // namespace troupe::engine::cuda
