// Samples logits rows on the GPU with exactly the host sampler's semantics (sampler.cpp:
// penalties, banned tokens, greedy argmax or temperature / top-k / top-p / min-p with the same
// splitmix draw per (seed, index), logprob of the sampled token and top_logprobs). Only token ids
// and logprobs come back to the host. Used by cuda_executor and the GPU tests. Plain C++ header.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "engine/sampling/sampler.hpp"
#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

class gpu_sampler {
 public:
  virtual ~gpu_sampler() = default;

  // Samples job j from row jobs[j].row of `logits` (device memory, fp32 [rows, vocab]) on
  // `stream` (a cudaStream_t; null = the default stream) and returns one seq_output per job, in
  // order (ids left 0). Penalised and banned entries of those rows are overwritten in place.
  // Blocks the calling thread until the results are on the host.
  virtual expected<std::vector<seq_output>> sample(float* logits, int64_t vocab,
                                                   std::span<const row_job> jobs, void* stream) = 0;
};

// A sampler on the current CUDA device; errors when built without CUDA.
expected<std::unique_ptr<gpu_sampler>> make_gpu_sampler();

} // namespace troupe::engine
