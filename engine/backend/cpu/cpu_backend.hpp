// The float32 CPU backend: the reference every other backend and parallel layout is checked
// against, and what CI runs. Holds the full weights as float32 and a paged KV cache.
// forward() blocks the calling thread (a worker actor's own thread in serving).
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "engine/backend/backend.hpp"
#include "engine/model/safetensors.hpp"

namespace troupe::engine {

class cpu_backend final : public backend {
public:
  // Reads config.json and the safetensors weights from a model folder, or config and weights
  // (dequantised to float32) from a llama.cpp `.gguf` file, or a folder holding one .gguf and
  // no config.json (see gguf_model_file).
  static expected<std::unique_ptr<cpu_backend>> load(const std::filesystem::path& model_dir,
                                                     kv_cache_options kv);
  static expected<std::unique_ptr<cpu_backend>> create(model_config config,
                                                       const weight_source& weights,
                                                       kv_cache_options kv);

  const model_config& config() const override { return config_; }
  kv_cache_options kv_options() const override { return kv_; }
  expected<void> forward(const step_plan& plan, forward_output& out) override;

private:
  struct expert {
    std::vector<float> gate, up; // [moe_intermediate, hidden]
    std::vector<float> down;     // [hidden, moe_intermediate]
  };
  struct layer {
    std::vector<float> input_norm, post_norm; // [hidden]
    std::vector<float> wq, wk, wv, wo;        // [q_size, hidden], [kv_size, hidden] x2, [hidden, q_size]
    std::vector<float> bq, bk, bv, bo;        // empty when the model has no such bias
    std::vector<float> q_norm, k_norm;        // [head_dim] (Qwen3)
    std::vector<float> gate, up, down;        // dense MLP
    std::vector<float> router;                // [num_experts, hidden] (MoE)
    std::vector<expert> experts;
  };
  // Per-step token bookkeeping shared by the layer functions.
  struct batch {
    std::vector<int32_t> positions; // [T]
    std::vector<int32_t> seq_of;    // [T] index into plan.seqs
  };

  cpu_backend() = default;
  expected<void> load_layer(const weight_source& w, int64_t l);
  void attention_block(const layer& w, int64_t l, const step_plan& plan, const batch& b,
                       std::vector<float>& x);
  void attend(int64_t l, std::span<const int32_t> table, int32_t pos, const float* q,
              float* out) const;
  void mlp_block(const layer& w, std::vector<float>& x, int64_t n);
  void moe(const layer& w, const float* h, int64_t n, float* out) const;
  float* k_block(int64_t l, int32_t block) const;
  float* v_block(int64_t l, int32_t block) const;

  model_config config_;
  kv_cache_options kv_;
  std::vector<float> inv_freq_;
  std::vector<float> embed_;      // [vocab, hidden]
  std::vector<float> final_norm_; // [hidden]
  std::vector<float> lm_head_;    // [vocab, hidden]; empty when tied to embed_
  std::vector<layer> layers_;
  // [layers][num_blocks][block_size][num_kv_heads][head_dim]
  mutable std::vector<float> k_cache_, v_cache_;
};

} // namespace troupe::engine
