// The float32 CPU backend: the reference every other backend and parallel layout is checked
// against, and what CI runs. Holds the full weights as float32 and a paged KV cache.
// Sharded for tensor/pipeline parallelism when created with a parallel_context (shard.hpp says
// what each rank holds); every rank of the grid then calls forward() with the same plan.
// forward() blocks the calling thread (a worker actor's own thread in serving).
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "engine/backend/backend.hpp"
#include "engine/backend/cpu/moe.hpp"
#include "engine/backend/shard.hpp"
#include "engine/comm/communicator.hpp"
#include "engine/model/load_progress.hpp"
#include "engine/model/safetensors.hpp"

namespace troupe::engine {

// One rank's place in a tensor x pipeline grid and its communicators (owned by the caller, who
// keeps them alive as long as the backend). `tensor` joins the tp_size ranks of this stage, in
// tp_rank order; `world` joins all ranks in world_rank order (pipeline send/recv and the logits
// broadcast; unused when pp_size == 1). Null communicators are allowed only for a size of 1.
// broadcast_logits = false: only the last stage makes logits (the others pass the hidden states
// on and are free for the next plan at once; see backend::makes_logits).
struct parallel_context {
  parallel_layout layout;
  comm::communicator* tensor = nullptr;
  comm::communicator* world = nullptr;
  bool broadcast_logits = true;
  // Expert parallelism over data-parallel attention: each rank of `experts` is a whole model for
  // attention (tensor = pipeline = 1) with its own sequences, KV cache and batch, and holds the
  // whole experts split_range(num_experts, experts->size(), experts->rank()); MoE layers send
  // each token's rows to the experts' ranks and back (cpu::moe_all_to_all). Every rank of the
  // group must run forward() the same number of times, in lockstep (lockstep_executor arranges
  // that; deployments do not build such groups yet). Null: experts as parallel_layout places
  // them.
  comm::communicator* experts = nullptr;
};

class cpu_backend final : public backend {
 public:
  // Reads config.json and the safetensors weights from a model folder, or config and weights
  // (dequantised to float32) from a llama.cpp `.gguf` file, or a folder holding one .gguf and
  // no config.json (see gguf_model_file).
  static expected<std::unique_ptr<cpu_backend>> load(const std::filesystem::path& model_dir,
                                                     kv_cache_options kv);
  // The same, this rank's shard only (see create with a parallel_context below). `progress`,
  // when set, gets this rank's load progress (load_progress.hpp) on this thread.
  static expected<std::unique_ptr<cpu_backend>> load(const std::filesystem::path& model_dir,
                                                     kv_cache_options kv, parallel_context par,
                                                     const load_callback& progress = {});
  static expected<std::unique_ptr<cpu_backend>>
  create(model_config config, const weight_source& weights, kv_cache_options kv);
  // This rank's shard only: reads just its slices from `weights`. forward() on every rank of
  // the grid returns the full logits (all-gathered over tensor, broadcast from the last stage).
  static expected<std::unique_ptr<cpu_backend>> create(model_config config,
                                                       const weight_source& weights,
                                                       kv_cache_options kv, parallel_context par);

  ~cpu_backend() override { listener_.reset(); } // before the KV memory it may read
  const model_config& config() const override { return config_; }
  kv_cache_options kv_options() const override { return kv_; }
  expected<void> forward(const step_plan& plan, forward_output& out) override;
  bool makes_logits() const override;
  kv_layout kv_memory() const override;
  expected<void> set_kv_listener(std::shared_ptr<kv_layer_listener> listener) override {
    listener_ = std::move(listener);
    return {};
  }

 private:
  struct expert {
    std::vector<float> gate, up; // [moe_intermediate, hidden]
    std::vector<float> down;     // [hidden, moe_intermediate]
  };
  struct layer {
    std::vector<float> input_norm, post_norm;   // [hidden]
    std::vector<float> wq, wk, wv, wo;          // local: [q, hidden], [kv, hidden] x2, [hidden, q]
    std::vector<float> bq, bk, bv, bo;          // empty when the model has no such bias
    std::vector<float> q_norm, k_norm;          // [head_dim] (Qwen3)
    std::vector<float> gate, up, down;          // dense MLP, this rank's intermediate slice
    std::vector<float> router;                  // [num_experts, hidden] (MoE)
    std::vector<expert> experts;                // this rank's experts, shard_.experts
    std::vector<cpu::expert_view> expert_views; // into `experts`
  };
  // Per-step token bookkeeping shared by the layer functions.
  struct batch {
    std::vector<int32_t> positions; // [T]
    std::vector<int32_t> seq_of;    // [T] index into plan.seqs
  };

  cpu_backend() = default;
  expected<void> run(const step_plan& plan, forward_output& out, bool listening);
  // The slices of the weights this rank holds (the experts' group overridden by par.experts).
  static expected<shard_plan> shard_of(const model_config& config, const parallel_context& par);
  expected<void> load_layer(const weight_source& w, int64_t l);
  expected<void> attention_block(const layer& w, int64_t l, const step_plan& plan, const batch& b,
                                 std::vector<float>& x);
  void attend(int64_t l, std::span<const int32_t> table, int32_t pos, const float* q,
              float* out) const;
  expected<void> mlp_block(const layer& w, std::vector<float>& x, int64_t n);
  expected<void> embed(const step_plan& plan, std::vector<float>& x);
  expected<void> logits(const std::vector<float>& h, int32_t rows, forward_output& out);
  const std::vector<float>& head() const { return lm_head_.empty() ? embed_ : lm_head_; }
  int64_t q_local() const { return shard_.heads.size() * config_.head_dim; }
  int64_t kv_local() const { return shard_.kv_heads.size() * config_.head_dim; }
  void moe(const layer& w, const float* h, int64_t n, float* out) const;
  float* k_block(int64_t l, int32_t block) const;
  float* v_block(int64_t l, int32_t block) const;

  model_config config_;
  kv_cache_options kv_;
  parallel_context par_;
  shard_plan shard_;
  std::unique_ptr<comm::communicator> own_comm_; // single-rank stand-in when none was given
  std::vector<float> inv_freq_;
  std::vector<float> embed_;      // [vocab shard, hidden]
  std::vector<float> final_norm_; // [hidden]
  std::vector<float> lm_head_;    // [vocab shard, hidden]; empty when tied to embed_
  std::vector<layer> layers_;     // this stage's layers only (others left empty)
  // [stage layers][num_blocks][block_size][local kv heads][head_dim]
  mutable std::vector<float> k_cache_, v_cache_;
  std::shared_ptr<kv_layer_listener> listener_;
};

} // namespace troupe::engine
