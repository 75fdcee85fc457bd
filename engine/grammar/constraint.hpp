// A per-request constraint on generated tokens (structured output): before each sampled token the
// scheduler asks it which tokens may come next (a bitmask the samplers apply to the logits), and
// afterwards tells it the token that came. Implemented by engine/grammar/grammar.hpp over
// xgrammar; the scheduler sees only this interface. Used on the scheduler's thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/step.hpp"

namespace troupe::engine {

class token_constraint {
 public:
  virtual ~token_constraint() = default;
  // The tokens allowed next as a bitmask over the model's vocabulary: token t is allowed when bit
  // t % 32 of mask[t / 32] is set. `mask` is resized to (vocab + 31) / 32 words.
  virtual void fill_mask(std::vector<uint32_t>& mask) = 0;
  // Advances past `t`; false when `t` is not allowed here (the state is then unchanged).
  virtual bool accept(token_id t) = 0;
  // The output is complete (a stop token was accepted after a full match): nothing may follow.
  virtual bool terminated() const = 0;
  // A constraint in the same state with its own future (the prefill side of a disaggregated
  // request samples the first token with a copy).
  virtual std::unique_ptr<token_constraint> fork() const = 0;
};

// Whether bit t of a token bitmask is set.
inline bool mask_allows(const std::vector<uint32_t>& mask, token_id t) {
  const auto w = static_cast<size_t>(t) / 32;
  return t >= 0 && w < mask.size() && ((mask[w] >> (static_cast<uint32_t>(t) % 32)) & 1u) != 0;
}

} // namespace troupe::engine
