// A fake model for scheduler tests: the next token is a hash of the last token and its
// position, so a request's output depends only on its prompt, never on batching. It keeps what
// each KV slot holds and checks every step against the true token history: cached-prefix reads,
// preemption and block reuse must all see exactly the tokens they should. The history comes from
// the test (history_fn) or, without one, from what this executor saw: each position's token as
// first fed (or found in the KV slots a sequence starts past), then every token it sampled, as
// the ranks of a replica know it (plans made ahead, cancellations while a plan runs).
#pragma once

#include <algorithm>
#include <functional>
#include <map>
#include <vector>

#include <doctest/doctest.h>

#include "engine/exec/executor.hpp"
#include "engine/grammar/constraint.hpp"

namespace troupe::test {

inline token_id fake_next(token_id last, int64_t pos, int32_t vocab) {
  uint64_t x = static_cast<uint64_t>(last) * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(pos);
  x ^= x >> 29;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 32;
  return static_cast<token_id>(x % static_cast<uint64_t>(vocab));
}

class fake_executor final : public engine::executor {
 public:
  using history_fn = std::function<const std::vector<token_id>*(seq_id)>;
  fake_executor(int32_t num_blocks, int32_t block_size, int32_t vocab, history_fn history)
    : bs_(block_size), vocab_(vocab), history_(std::move(history)),
      kv_(static_cast<size_t>(num_blocks) * block_size, {-1, -1}) {}

  // Set by tests to fail the next execute().
  bool fail_next = false;
  int64_t errors = 0; // KV or token mismatches seen (each also a failed CHECK)

  expected<step_result> execute(const step_plan& plan) override {
    if (fail_next) {
      fail_next = false;
      return make_error(errc::unavailable, "fake executor told to fail");
    }
    step_result r{.step = plan.step};
    for (const auto& s : plan.seqs) {
      const auto* truth = history_ ? history_(s.id) : &seen(s);
      REQUIRE(truth != nullptr);
      const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
      REQUIRE(static_cast<int64_t>(s.block_table.size()) * bs_ >= end);
      REQUIRE(static_cast<int64_t>(truth->size()) >= end);
      for (int64_t p = 0; p < s.start_pos; ++p) // the cache must hold this sequence's tokens
        expect(slot(s, p) == std::pair<token_id, int64_t>{(*truth)[p], p}, s.id, p);
      for (int64_t k = 0; k < static_cast<int64_t>(s.tokens.size()); ++k) {
        expect(s.tokens[k] == (*truth)[s.start_pos + k], s.id, s.start_pos + k);
        slot(s, s.start_pos + k) = {s.tokens[k], s.start_pos + k};
      }
      if (s.logits == logits_mode::none)
        continue;
      token_id t = fake_next(s.tokens.back(), end - 1, vocab_);
      while (std::find(s.banned_tokens.begin(), s.banned_tokens.end(), t) != s.banned_tokens.end())
        t = (t + 1) % vocab_;
      for (int32_t k = 0;
           k < vocab_ && !s.allowed_tokens.empty() && !engine::mask_allows(s.allowed_tokens, t);
           ++k) // a grammar's mask, as the samplers apply it
        t = (t + 1) % vocab_;
      r.outputs.push_back({.id = s.id, .token = t, .logprob = -1.0f});
      if (!history_ && static_cast<int64_t>(seen_[s.id].size()) == end)
        seen_[s.id].push_back(t);
    }
    return r;
  }

  // What the fake KV cache holds at (block, offset): (token, position), or (-1, -1). Handoff
  // tests copy slots between two executors as a KV transfer would.
  std::pair<token_id, int64_t>& kv_slot(int32_t block, int32_t offset) {
    return kv_[static_cast<size_t>(block) * bs_ + offset];
  }

 private:
  std::pair<token_id, int64_t>& slot(const seq_step& s, int64_t p) {
    return kv_[static_cast<size_t>(s.block_table[static_cast<size_t>(p / bs_)]) * bs_ + p % bs_];
  }
  // Without a history_fn: s's tokens as this executor knows them, extended by this step's.
  const std::vector<token_id>& seen(const seq_step& s) {
    auto& t = seen_[s.id];
    for (auto q = static_cast<int64_t>(t.size()); q < s.start_pos; ++q) // started past them
      t.push_back(slot(s, q).first);
    for (size_t k = 0; k < s.tokens.size(); ++k)
      if (s.start_pos + static_cast<int64_t>(k) == static_cast<int64_t>(t.size()))
        t.push_back(s.tokens[k]);
    return t;
  }
  void expect(bool ok, seq_id id, int64_t p) {
    if (!ok) {
      ++errors;
      FAIL_CHECK("sequence " << id << " position " << p << ": KV or token mismatch");
    }
  }
  int32_t bs_, vocab_;
  history_fn history_;
  std::vector<std::pair<token_id, int64_t>> kv_;
  std::map<seq_id, std::vector<token_id>> seen_;
};

// The output a request gets when it runs alone: the fake model's chain from its prompt.
inline std::vector<token_id> fake_alone(const std::vector<token_id>& prompt, int32_t max_tokens,
                                        int32_t vocab, token_id eos, int32_t min_tokens,
                                        int32_t max_model_len) {
  std::vector<token_id> all = prompt, out;
  while (static_cast<int32_t>(out.size()) < max_tokens &&
         static_cast<int32_t>(all.size()) < max_model_len) {
    token_id t = fake_next(all.back(), static_cast<int64_t>(all.size()) - 1, vocab);
    if (t == eos && static_cast<int32_t>(out.size()) < min_tokens)
      t = (t + 1) % vocab;
    all.push_back(t);
    out.push_back(t);
    if (t == eos)
      break;
  }
  return out;
}

} // namespace troupe::test
