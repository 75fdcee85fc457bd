// The bf16 CUDA backend: weights and KV cache on one GPU, cuBLASLt and our own kernels
// (kernels.cuh, attention.cu, gemm.cu); one rank of a tensor x pipeline grid when given a layout
// and device communicators (shard.hpp says what each rank holds). Plain C++ header, so that code
// built without nvcc can create and drive it. forward() blocks the calling thread until the
// step's results are on the host; every rank of a grid calls it with the same plan.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.hpp"
#include "engine/backend/shard.hpp"
#include "engine/comm/device_communicator.hpp"
#include "engine/model/load_progress.hpp"
#include "engine/model/weight_source.hpp"

namespace troupe::engine {

struct cuda_options {
  int device = 0;
  int max_num_batched_tokens = 8192;   // most tokens in one step (sizes the activation workspace)
  int max_num_seqs = 256;              // most sequences in one step
  int max_logit_rows = 256;            // most logits rows in one step
  int max_model_len = 0;               // 0 = config.max_position_embeddings
  float gpu_memory_utilization = 0.9f; // KV pool size when kv.num_blocks == 0
  bool random_weights = false;         // benchmarks: fill weights on the GPU instead of loading
  uint64_t seed = 1;
  // Model parallelism (the caller owns the communicators and keeps them alive as long as the
  // backend): `tensor` joins this stage's tp_size ranks in tp_rank order, `world` every rank in
  // world_rank order (pipeline send/recv and the logits broadcast). Null only for a size of 1.
  // CUDA graphs are used only when every communicator is capturable (NCCL, not host-staged).
  parallel_layout layout;
  comm::device_communicator* tensor = nullptr;
  comm::device_communicator* world = nullptr;
  // false: only the last stage makes logits; earlier stages' forward() leaves them empty and
  // returns once the hidden states are passed on (see backend::makes_logits).
  bool broadcast_logits = true;
  // Counts the bytes the loader copies directly from a safetensors store (the weights that are
  // a counted_weights count the rest); null: not counted.
  load_progress* progress = nullptr;
};

// Where a cold start's time went (cuda_backend::load_timings), for the serve log.
struct cuda_load_timings {
  double weights_s = 0; // every weight read and on the GPU (reading and copying overlap)
  double read_s = 0;    // host time gathering file bytes into staging, summed over threads
  int loader_threads = 0;
  size_t weight_file_bytes = 0; // bytes read from the checkpoint (stored types)
  double workspace_s = 0;       // activation workspace allocation
  double kv_s = 0;              // KV pool allocation
};

class cuda_backend : public backend {
 public:
  // Greedy step: like forward(), but only each row's argmax comes back (one id per logits row).
  virtual expected<void> forward_greedy(const step_plan& plan, std::vector<token_id>& tokens) = 0;
  // Like forward(), but the logits stay on the GPU (for the GPU sampler): fills out.first_row /
  // num_rows, leaves out.logits empty, and returns the device address of the fp32 logits
  // [rows, vocab] (null when no row), valid until the next step. Queued on stream(); returns
  // without waiting for the step.
  virtual expected<float*> forward_on_device(const step_plan& plan, forward_output& out) = 0;
  virtual void* stream() const = 0; // the backend's cudaStream_t
  virtual size_t weight_bytes() const = 0;
  virtual size_t kv_bytes() const = 0;
  virtual cuda_load_timings load_timings() const = 0;
  // Decode steps replay CUDA graphs captured per batch size; off = always eager (and always off
  // with a communicator that cannot be captured).
  virtual void set_use_graphs(bool on) = 0;
  // Runs a decode step of the next batch bucket not yet met (its GEMMs timed, its graph
  // captured), so that no batch size is first met under load: true if it ran one, false once
  // none is left (at once on a rank of a tensor or pipeline group, whose ranks would have to do
  // it in lockstep). For idle time: the executor's thread calls it while no plan waits.
  virtual expected<bool> warm_up_next() = 0;
  virtual void set_use_skinny_gemm(bool on) = 0;
};

// Empty when a CUDA device is usable, else why not ("built without CUDA", driver errors, ...).
std::string cuda_unavailable_reason();

// `weights` may be null only with options.random_weights.
expected<std::unique_ptr<cuda_backend>> make_cuda_backend(const model_config& config,
                                                          const weight_source* weights,
                                                          kv_cache_options kv,
                                                          cuda_options options);

} // namespace troupe::engine
