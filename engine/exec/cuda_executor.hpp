// An executor on one GPU: the CUDA backend's forward pass with the logits left on the device,
// then the GPU sampler on them; only token ids and logprobs come back. The host sampler's
// bookkeeping half (penalty state per sequence, rows to sample) runs here. Used by
// `cluster serve` with device: cuda and by the GPU tests. execute() blocks.
#pragma once

#include <filesystem>
#include <memory>

#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/gpu_sampler.hpp"
#include "engine/exec/executor.hpp"
#include "engine/sampling/sampler.hpp"

namespace troupe::engine {

class cuda_executor final : public executor {
 public:
  // `model` must outlive the executor. Errors when built without CUDA.
  static expected<std::unique_ptr<cuda_executor>> create(cuda_backend& model);
  expected<step_result> execute(const step_plan& plan) override {
    return execute_filling(plan, {});
  }
  expected<step_result> execute_filling(const step_plan& plan, const mask_fill& fill) override;
  bool idle_work() override; // a decode batch bucket warmed up (cuda_backend::warm_up_next)

 private:
  cuda_executor(cuda_backend& model, std::unique_ptr<gpu_sampler> gpu)
    : model_(model), gpu_(std::move(gpu)) {}
  cuda_backend& model_;
  std::unique_ptr<gpu_sampler> gpu_;
  sampler host_;
  forward_output out_;
  int warmed_ = 0;      // idle_work(): buckets warmed up so far
  double warm_s_ = 0.0; // and the time they took
};

// Loads a Hugging Face folder or a .gguf file onto a GPU (bf16): weights, then workspace, then a
// KV pool of kv.num_blocks blocks (0 = sized from options.gpu_memory_utilization). Errors name
// the reason when no GPU is usable. Blocks while loading. `progress`, when set, gets the rank's
// load progress (load_progress.hpp), on this thread and the loader's threads.
expected<std::unique_ptr<cuda_backend>> load_cuda_backend(const std::filesystem::path& model,
                                                          kv_cache_options kv, cuda_options options,
                                                          const load_callback& progress = {});

} // namespace troupe::engine
