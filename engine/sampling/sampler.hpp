// Turns logits into tokens: penalties, banned tokens, greedy or temperature / top-k / top-p /
// min-p sampling with a per-request seed, and logprobs. Runs on the worker of the last pipeline
// stage (local_executor in-process); deterministic given the plan, so every rank agrees.
// Nothing here blocks.
#pragma once

#include <span>
#include <unordered_map>
#include <vector>

#include "engine/sampling/logits.hpp"
#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

// Rejects parameters outside their ranges; the message names the parameter
// (e.g. "top_p must be in (0, 1], got 0").
expected<void> validate(const sampling_params& p);

bool uses_penalties(const sampling_params& p);

// Tokens a sequence has seen, for the repetition, presence and frequency penalties.
struct penalty_state {
  struct entry {
    bool in_prompt = false;
    int32_t output_count = 0;
  };
  std::unordered_map<token_id, entry> tokens;
  void add(token_id t, bool prompt) {
    auto& e = tokens[t];
    if (prompt)
      e.in_prompt = true;
    else
      ++e.output_count;
  }
};

// What one row's sampling needs beyond the logits.
struct sample_inputs {
  const sampling_params* params = nullptr;
  uint64_t index = 0;                       // generated tokens before this one (random draw)
  std::span<const token_id> banned;         // logits forced to -inf
  const penalty_state* penalties = nullptr; // null when no penalty is on
  std::span<const uint32_t> allowed;        // seq_step::allowed_tokens (empty: all)
};

// Samples one token from `logits` ([vocab]). `scratch` is reused between calls.
seq_output sample_row(std::span<const float> logits, const sample_inputs& in,
                      std::vector<float>& scratch);

// Prompt logprobs (sampling.prompt_logprobs): scores the prompt positions that seq_step i's rows
// predict (a logits_mode::all step) into `scored`. internal error for a token outside the logits.
expected<void> score_prompt(const seq_step& s, const forward_output& out, size_t i,
                            std::vector<position_logprobs>& scored);
// Whether any seq_step of `plan` has prompt positions to score (needs its logits on the host).
bool scores_prompt(const step_plan& plan);

// The uniform draw in [0, 1) for (seed, index): splitmix64, shared bit for bit by the GPU
// sampler (engine/backend/cuda/gpu_sampler.cu), so that both pick the same token.
double sample_uniform(uint64_t seed, uint64_t index);

// One logits row to sample: which seq_step of the plan, which row of forward_output, and the
// inputs (pointing into the plan and into the sampler's penalty state: valid until the next call).
struct row_job {
  size_t seq = 0;  // index into plan.seqs
  int32_t row = 0; // logits row (forward_output::first_row + num_rows - 1)
  sample_inputs in;
};

// The per-worker sampler: keeps penalty state per sequence across steps (dropped on
// plan.finished and seq_step::first_step) and samples every seq_step that asked for logits
// (except prompt chunks that ask only for their prompt logprobs), scoring prompt positions too.
class sampler {
 public:
  expected<step_result> sample(const step_plan& plan, const forward_output& out);

  // The bookkeeping half of sample(): updates the penalty state with the plan's tokens and lists
  // the rows to sample, in plan order (out.logits is not read). The GPU sampler samples these rows
  // on the device; sample() samples them here. Prompt scoring is sample()'s only.
  expected<std::vector<row_job>> prepare(const step_plan& plan, const forward_output& out);

  size_t num_tracked() const { return state_.size(); }

 private:
  std::unordered_map<seq_id, penalty_state> state_;
  std::vector<float> scratch_;
};

} // namespace troupe::engine
