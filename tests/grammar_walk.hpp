// Random walks through a structured-output constraint: every step draws one of the tokens its mask
// allows, uniformly, until an EOS (a complete output) or max_steps. On the way it checks that the
// mask holds no special token but EOS and that a token outside the mask is refused. Used by the
// grammar tests in the engine and on the HTTP path.
#pragma once

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "engine/grammar/constraint.hpp"
#include "engine/tokenizer/tokenizer.hpp"

namespace troupe::test {

struct walk_result {
  std::string text;      // the output before the EOS
  bool complete = false; // ended with an EOS the grammar allowed
  int steps = 0;
};

inline walk_result walk(const engine::tokenizer& text, const std::vector<token_id>& eos,
                        int64_t vocab, engine::token_constraint& c, std::mt19937_64& rng,
                        int max_steps) {
  auto is_eos = [&](token_id t) { return std::find(eos.begin(), eos.end(), t) != eos.end(); };
  walk_result r;
  std::vector<uint32_t> mask;
  std::vector<token_id> allowed;
  for (; r.steps < max_steps; ++r.steps) {
    c.fill_mask(mask);
    REQUIRE(mask.size() == static_cast<size_t>((vocab + 31) / 32));
    allowed.clear();
    for (token_id t = 0; t < vocab; ++t)
      if (engine::mask_allows(mask, t))
        allowed.push_back(t);
    REQUIRE_MESSAGE(!allowed.empty(), "no token allowed after: ", r.text);
    const auto special = std::find_if(allowed.begin(), allowed.end(),
                                      [&](token_id t) { return !is_eos(t) && text.is_special(t); });
    REQUIRE_MESSAGE(special == allowed.end(), "special token ", *special, " allowed");
    const auto refused = static_cast<token_id>(rng() % static_cast<uint64_t>(vocab));
    if (!engine::mask_allows(mask, refused))
      CHECK_FALSE(c.accept(refused));
    const token_id t = allowed[rng() % allowed.size()];
    REQUIRE(c.accept(t));
    if (is_eos(t)) {
      r.complete = true;
      CHECK(c.terminated());
      return r;
    }
    r.text += text.token_bytes(t);
  }
  return r;
}

} // namespace troupe::test
