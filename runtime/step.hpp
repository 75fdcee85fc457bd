// The unit of work between the scheduler (serving actor) and the workers: a step plan says which
// tokens of which sequences to run through the model this step; a step result says what came out.
// Plans hold ids, positions and block tables, never tensors. Every TP rank gets the same plan.
#pragma once

#include <cstdint>
#include <vector>

namespace troupe {

using seq_id = uint64_t;
using token_id = int32_t;

// How a request wants its next tokens chosen (OpenAI/vLLM semantics; validated by the scheduler).
struct sampling_params {
  float temperature = 1.0f;        // 0 = greedy
  float top_p = 1.0f;              // (0, 1]
  int32_t top_k = 0;               // 0 or -1 = off
  float min_p = 0.0f;              // [0, 1]
  float repetition_penalty = 1.0f; // > 0; 1 = off
  float presence_penalty = 0.0f;   // [-2, 2]
  float frequency_penalty = 0.0f;  // [-2, 2]
  bool has_seed = false;
  uint64_t seed = 0;
  int32_t logprobs = -1; // -1 = none, else number of top logprobs to return (0 = sampled only)
  // The prompt's logprobs (vLLM prompt_logprobs; OpenAI echo with logprobs): -1 = none, else the
  // number of top logprobs per prompt position beside the prompt token's own. A request with them
  // computes its whole prompt (no prefix cache, no KV handoff).
  int32_t prompt_logprobs = -1;
  // OpenAI logit_bias: bias_values[i] in [-100, 100] is added to the logit of bias_tokens[i]
  // (ascending distinct ids) after the penalties, before sampling; logprobs stay those of the raw
  // logits.
  std::vector<token_id> bias_tokens;
  std::vector<float> bias_values;
  // Not sampling knobs but request limits, kept here so that one struct carries a request's
  // OpenAI parameters (validated by the scheduler; the sampler sees their effect through
  // seq_step::banned_tokens).
  int32_t max_tokens = 16; // >= 1
  int32_t min_tokens = 0;  // [0, max_tokens]: EOS and stop_token_ids are banned until reached
  bool ignore_eos = false; // keep generating after the model's EOS tokens
};

// Which logits a sequence's share of a step produces.
enum class logits_mode : uint8_t {
  none, // middle chunk of a chunked prefill: nothing to sample
  last, // logits of the last fed token (end of prefill, or decode)
  all,  // logits of every fed token (prompt logprobs, conformance tests)
};

// In seq_step::tokens of a plan made ahead (engine_loop at pipeline 1 schedules step n+1 while
// step n runs), for a decode token: the token this sequence samples in step n, unknown when the
// plan was made. An executor puts it in before computing (executor::run), from what it sampled
// itself.
inline constexpr token_id previous_sample = -1;

// One sequence's share of a step: feed `tokens` at positions start_pos .. start_pos+n-1.
struct seq_step {
  seq_id id = 0;
  int32_t start_pos = 0;        // tokens of this sequence already in its KV cache
  std::vector<token_id> tokens; // [n] tokens fed this step (a prefill chunk, or one decode token)
  std::vector<int32_t> block_table; // physical KV blocks holding positions [0, start_pos + n)
  logits_mode logits = logits_mode::last;
  sampling_params sampling; // the scheduler always sets has_seed (it picks a seed when the
                            // request gave none), so every rank samples the same token
  // Positions [0, num_prompt_tokens) hold the prompt; later ones generated tokens (penalties
  // count those). The sampled token's index among generated tokens is
  // start_pos + tokens.size() - num_prompt_tokens, which also picks its random draw.
  int32_t num_prompt_tokens = 0;
  // First step since the sequence was admitted (or re-admitted after preemption): drop any
  // per-sequence state (penalty counts) and rebuild it from this and later steps' tokens.
  bool first_step = false;
  // With first_step, start_pos > 0 (prefix cache hit) and penalties on: the tokens at positions
  // [0, start_pos), which this worker never saw fed. Empty otherwise.
  std::vector<token_id> cached_prefix;
  // Token ids whose logits are -inf this step (EOS and stop_token_ids until min_tokens).
  std::vector<token_id> banned_tokens;
  // logits_mode::all with sampling.prompt_logprobs, for a chunk that ends inside the prompt: the
  // prompt token after the chunk (what its last row's logits are scored against); else -1.
  token_id next_prompt_token = -1;
  // Structured output: the tokens the request's grammar allows next, as a bitmask (token t is
  // allowed when bit t % 32 of word t / 32 is set; ids past the end are not); every other logit is
  // -inf. Empty: no constraint.
  std::vector<uint32_t> allowed_tokens;
};

struct step_plan {
  uint64_t step = 0; // monotonically increasing per replica
  std::vector<seq_step> seqs;
  // Sequences finished, cancelled or preempted since the previous plan: workers drop their
  // per-sequence state (sampler penalty counts).
  std::vector<seq_id> finished;

  int32_t num_tokens() const {
    int32_t n = 0;
    for (const auto& s : seqs)
      n += static_cast<int32_t>(s.tokens.size());
    return n;
  }
};

// A prompt token's log-probability under the logits of the position before it (raw logits, as
// the sampled tokens' logprobs), its rank in that distribution (1 = the most likely) and the top
// candidates there (ties: lower id first).
struct position_logprobs {
  int32_t position = 0; // of `token` in the sequence (>= 1)
  token_id token = -1;
  float logprob = 0.0f;
  int32_t rank = 0;
  std::vector<token_id> top_ids;
  std::vector<float> top_logprobs;
};

// What the last pipeline stage (TP rank 0) sends back for one sequence.
struct seq_output {
  seq_id id = 0;
  token_id token = -1;  // sampled token; -1 when this step samples none (a prompt chunk)
  float logprob = 0.0f; // log-probability of `token` under the model (log-softmax of raw logits)
  std::vector<token_id> top_ids; // top logprobs when requested (raw logits, ties: lower id)
  std::vector<float> top_logprobs;
  // sampling.prompt_logprobs: the prompt positions this step's rows score, in order.
  std::vector<position_logprobs> prompt_logprobs;
};

struct step_result {
  uint64_t step = 0;
  // One per seq_step with logits != none, in plan order.
  std::vector<seq_output> outputs;
};

} // namespace troupe
