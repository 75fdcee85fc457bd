// Offline greedy generation for demos (`cluster generate`) and tests: runs several prompts
// together through one backend, in chunked prefill and decode steps, over non-contiguous KV
// blocks. Serving uses the scheduler instead; this stays the simplest correct driver.
// Blocks the calling thread.
#pragma once

#include <vector>

#include "engine/backend/backend.hpp"

namespace troupe::engine {

struct generate_options {
  int32_t max_new_tokens = 16;
  int32_t prefill_chunk = 0; // tokens of a prompt fed per step; 0 = the whole prompt at once
  bool stop_at_eos = false;  // stop a sequence at the model's EOS ids
  bool record_prompt_logits = false; // fill prompt_argmax and last_prompt_logits
};

struct generation {
  std::vector<token_id> prompt;
  std::vector<token_id> output;
  std::vector<token_id> prompt_argmax;   // argmax after every prompt position (if recorded)
  std::vector<float> last_prompt_logits; // [vocab] at the last prompt position (if recorded)
};

// Greedy (argmax, lowest id on ties) continuation of every prompt, all in the same steps.
expected<std::vector<generation>> generate_greedy(backend& model,
                                                  const std::vector<std::vector<token_id>>& prompts,
                                                  const generate_options& options);

token_id argmax(std::span<const float> logits);

} // namespace troupe::engine
