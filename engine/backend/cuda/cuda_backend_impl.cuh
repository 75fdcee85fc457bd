// Internal to the CUDA backend: the implementation class shared by cuda_backend.cu (setup and
// weight loading) and cuda_step.cu (running steps). Not for use outside engine/backend/cuda.
#pragma once

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/cuda_loader.cuh"
#include "engine/backend/cuda/gemm.cuh"
#include "engine/backend/cuda/kernels.cuh"
#include "engine/backend/cuda/moe.cuh"
#include "engine/model/weight_source.hpp"

namespace troupe::engine::cuda {

// One layer's weights on the GPU, this rank's slices (nh, nkv, I: local heads, kv heads and
// intermediate rows). Matrices are bf16 [out, in]; norms are fp32.
struct gpu_layer {
  bf16* qkv = nullptr;      // [(nh + 2 nkv) D, H]: q rows, then k rows, then v rows
  bf16* qkv_bias = nullptr; // [(nh + 2 nkv) D] or null
  bf16* o = nullptr;        // [H, nh D]
  bf16* o_bias = nullptr;   // [H] or null (whole: added once, after the all-reduce)
  float* q_norm = nullptr;  // [D] or null
  float* k_norm = nullptr;
  float* in_norm = nullptr; // [H]
  float* post_norm = nullptr;
  bf16* gate_up = nullptr; // [2 I, H]: gate rows, then up rows (dense)
  bf16* down = nullptr;    // [H, I]
  bf16* router = nullptr;  // [E, H] (MoE, every expert)
  bf16* experts_gate_up =
      nullptr;                  // [local experts, 2 I, H] this rank's experts, I = moe_intermediate
  bf16* experts_down = nullptr; // [local experts, H, I]
};

// Part of one weight tensor: the engine's (engine/model/weight_source.hpp), as the shard's read
// list (shard_weight_reads) names it.
using engine::weight_slice;

// Per-step metadata, laid out in one pinned host buffer and one device buffer.
struct step_meta {
  int32_t* tokens;       // [T]
  int32_t* positions;    // [T]
  int32_t* token_seq;    // [T]
  int32_t* slots;        // [T]
  int32_t* logit_src;    // [R]
  int32_t* flash_tiles;  // [T, 3] (attention_args)
  int32_t* split_tokens; // [T]
  int32_t* decode_tiles; // [T, 3]
  int32_t* block_tables; // [S, max_blocks]
};

class cuda_backend_impl final : public cuda_backend {
 public:
  ~cuda_backend_impl() override;
  expected<void> init(const model_config& c, const weight_source* w, kv_cache_options kv,
                      cuda_options o);

  const model_config& config() const override { return config_; }
  kv_cache_options kv_options() const override { return kv_; }
  expected<void> forward(const step_plan& plan, forward_output& out) override;
  expected<void> forward_greedy(const step_plan& plan, std::vector<token_id>& tokens) override;
  expected<float*> forward_on_device(const step_plan& plan, forward_output& out) override;
  bool makes_logits() const override { return opt_.broadcast_logits || last_stage_; }
  kv_layout kv_memory() const override;
  void* stream() const override { return stream_; }
  size_t weight_bytes() const override { return weight_bytes_; }
  size_t kv_bytes() const override { return kv_buf_.bytes(); }
  cuda_load_timings load_timings() const override { return timings_; }
  void set_use_graphs(bool on) override { use_graphs_ = on; }
  expected<bool> warm_up_next() override;
  expected<void> set_kv_listener(std::shared_ptr<kv_layer_listener> listener) override {
    listener_ = std::move(listener);
    return {};
  }
  void set_use_skinny_gemm(bool on) override {
    if (on != gemm_.use_skinny)
      drop_graphs(); // they captured the other GEMM path
    gemm_.use_skinny = on;
    moe_path_ = on ? moe_path::auto_path : moe_path::tensor_core;
  }

 private:
  // Uploads the plan's metadata and sets T_/S_/R_, the attention split and graph_step_.
  expected<void> upload(const step_plan& plan);
  void choose_split(int max_ctx);
  // The largest decode batch the backend's limits allow (sequences, tokens, logits rows).
  int max_decode_batch() const {
    return std::min({opt_.max_num_seqs, opt_.max_num_batched_tokens, opt_.max_logit_rows});
  }

  void drop_graphs();
  expected<void> run_model(); // every kernel of one step, on stream_ (graph-capturable)
  // The step's kernels; tells the KV listener of `plan`'s layers (none for warm-up steps).
  expected<void> run_step(const step_plan* plan);
  expected<void> launch_step();        // run_model eagerly, or through a captured graph
  expected<void> layer_written(int l); // to the KV listener, with an event after layer l
  expected<void> layer(int l);
  // The MoE block into proj_ (next_norm null), or added to resid_ and normalised with next_norm
  // into h_ (tensor = 1).
  expected<void> moe(const gpu_layer& w, const float* next_norm);
  expected<void> lm_head(); // sel_ -> logits_ [R, V], gathered over the tensor group
  // Broadcasts `words` 4-byte values from the last stage to every rank (no-op at pipeline=1).
  expected<void> from_last_stage(void* data, size_t words);
  // Sums a partial result over the tensor group (no-op at tensor=1).
  expected<void> tp_sum(void* data, size_t count, comm::device_dtype t);
  // Waits for stream_; through the communicators (bounded by their timeouts) when there are any.
  expected<void> sync();
  expected<void> check_parallel(const cuda_options& o);
  expected<void> load_weights(const weight_source* w);
  expected<void> load_all_weights(const weight_source* w); // load_weights + uploader + timings
  expected<void> load_layer(const weight_source* w, int64_t l);
  expected<bf16*> matrix(const weight_source* w, const std::vector<weight_slice>& parts,
                         float scale);
  // matrix() into `dst`, which has room for the stacked parts.
  expected<void> matrix_into(const weight_source* w, const std::vector<weight_slice>& parts,
                             float scale, bf16* dst);
  expected<float*> vector_f32(const weight_source* w, const std::string& name, int64_t n);
  // Queues one slice's copy into dst ([p.rows(), p.cols()] bf16): as stored bytes from a
  // safetensors file, else as floats the source decodes on this thread.
  expected<void> upload_slice(const weight_source* w, const weight_slice& p, bf16* dst);
  expected<size_t> alloc_workspace();
  expected<void> alloc_kv(size_t workspace_bytes);
  bf16* k_cache(int l) const;
  template <class T>
  expected<T*> alloc(size_t count);

  model_config config_;
  kv_cache_options kv_;
  cuda_options opt_;
  shard_plan shard_;
  bool last_stage_ = true;
  int tp_ = 1;                  // tensor ranks
  bool comm_capturable_ = true; // every communicator may be recorded into a graph
  head_layout heads_;           // this rank's heads
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<kv_layer_listener> listener_;
  bool listening_ = false;                // this step's layers go to listener_ (eager steps)
  std::vector<cudaEvent_t> layer_events_; // by stage layer: recorded after it, for listener_
  gemm_runner gemm_;
  std::vector<device_buffer> weights_; // every weight allocation
  size_t weight_bytes_ = 0;
  std::unique_ptr<weight_uploader> uploader_; // while loading
  cuda_load_timings timings_;
  bf16* embed_ = nullptr;
  bf16* lm_head_ = nullptr; // == embed_ when tied
  float* final_norm_ = nullptr;
  float* inv_freq_ = nullptr;
  std::vector<gpu_layer> layers_; // this stage's layers only (others left empty)
  device_buffer kv_buf_;
  size_t layer_kv_elems_ = 0; // per layer, per K or V: [num_blocks * block_size, nkv, D]
  int max_blocks_ = 0;

  // Workspace for max_num_batched_tokens rows.
  device_buffer work_;
  float* resid_ = nullptr;      // [T, H]
  bf16* h_ = nullptr;           // [T, H] normalised input of the next projection
  bf16* qkv_ = nullptr;         // [T, qkv_width]
  bf16* attn_ = nullptr;        // [T, nh D]
  bf16* proj_ = nullptr;        // [T, H] o_proj / down_proj output
  bf16* mlp_ = nullptr;         // [T, 2 I] gate_up, then [T, I] activation after it
  bf16* act_ = nullptr;         // [T, I]
  float* moe_acc_ = nullptr;    // [T, H] this rank's experts' fp32 sum (tensor > 1)
  bf16* sel_ = nullptr;         // [R, H]
  float* logits_ = nullptr;     // [R, V]
  float* gather_in_ = nullptr;  // [R, vocab_chunk]: this rank's logits slice (tensor > 1)
  float* gather_out_ = nullptr; // [tp, R, vocab_chunk]
  float* router_ = nullptr;     // [T, E]
  int32_t* argmax_ = nullptr;
  float* partial_ = nullptr;
  size_t partial_floats_ = 0;
  moe_dims moe_dims_; // T set per step
  moe_workspace moe_ws_;
  moe_path moe_path_ = moe_path::auto_path;

  // Metadata
  device_buffer meta_dev_;
  int32_t* meta_host_ = nullptr;
  size_t meta_ints_ = 0;
  step_meta dev_{}, host_{};
  int T_ = 0, S_ = 0, R_ = 0, mb_ = 0, splits_ = 1;
  int pad_ = 0; // padding rows at the end of a decode step (in T_, S_ and R_)
  int sm_count_ = 132;
  bool graph_step_ = false; // a pure decode step: fixed shapes, replayable as a graph
  attention_args route_;    // this step's flash tiles / split tokens (counts, device pointers)
  std::vector<int> seq_tokens_;

  // CUDA graphs for pure decode steps, keyed by padded batch size.
  bool use_graphs_ = true;
  std::map<int, cudaGraphExec_t> graphs_;
  int warm_next_ = 1; // warm_up_next(): the batch size whose bucket comes next
};

} // namespace troupe::engine::cuda
