// Shared by the GPU golden tests: greedy tokens compared against a reference up to the first
// step whose reference margin (top1 - top2 of the float32 CPU backend's logits) is too small for
// bf16 to be held to the same choice.
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"

namespace troupe::test {

// Logit gap above which bf16 must pick the same token. MoE models get twice as much: near-tie
// router scores flip experts under bf16 (their logits' relative L2 tolerance is larger too), and
// the tensor-core attention rounds probabilities to bf16 (tiny-qwen3-moe, prompt 33, step 6
// diverged at a reference margin of 0.085).
constexpr double margin_needed = 0.05, moe_margin_needed = 0.1;

// top1 - top2 of the CPU reference's logits after `prefix`.
inline float cpu_margin(engine::cpu_backend& cpu, const std::vector<token_id>& prefix) {
  auto r =
      engine::generate_greedy(cpu, {prefix}, {.max_new_tokens = 0, .record_prompt_logits = true});
  REQUIRE(r.has_value());
  auto v = r->front().last_prompt_logits;
  std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<>());
  return v[0] - v[1];
}

// Checks greedy tokens `got` against `want` until the first step whose reference margin is small.
inline void check_greedy(engine::cpu_backend& cpu, const std::vector<token_id>& prompt,
                         const std::vector<token_id>& got, const std::vector<token_id>& want) {
  const double needed = cpu.config().num_experts > 0 ? moe_margin_needed : margin_needed;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    if (got[i] == want[i])
      continue;
    std::vector<token_id> prefix = prompt;
    prefix.insert(prefix.end(), want.begin(), want.begin() + static_cast<long>(i));
    float margin = cpu_margin(cpu, prefix);
    INFO("step " << i << ": got " << got[i] << ", reference " << want[i] << ", margin " << margin);
    CHECK(margin < needed);
    return; // past a near-tie the continuations legitimately differ
  }
}

} // namespace troupe::test
