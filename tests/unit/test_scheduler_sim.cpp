// A randomised simulation of the scheduler against the fake executor: thousands of requests
// with random prompt and output lengths, arrivals, shared prefixes and cancellations (also while
// a step is in flight). Every step checks the budget, block accounting (no leak, no double
// free) and, through the fake KV, that every cached or recomputed token is the right one.
// At the end every request finished exactly once, with the tokens it would get alone. Each runs
// twice: one plan at a time, and planned ahead (two outstanding, as at pipeline 1).
#include <random>
#include <set>

#include <doctest/doctest.h>

#include "sched_driver.hpp"

using namespace troupe;
using namespace troupe::engine;
using troupe::test::sched_driver;

namespace {

constexpr int32_t vocab = 400;
constexpr token_id eos = 0;

struct sim_config {
  int32_t num_blocks, block_size, budget, max_seqs;
  bool prefix_caching;
  int32_t num_requests;
};

void simulate(const sim_config& c, uint64_t seed, bool ahead) {
  scheduler_options o{.num_blocks = c.num_blocks,
                      .block_size = c.block_size,
                      .prefix_caching = c.prefix_caching,
                      .max_num_batched_tokens = c.budget,
                      .max_num_seqs = c.max_seqs,
                      .max_waiting = 100000,
                      .max_model_len = 400,
                      .vocab_size = vocab,
                      .eos_token_ids = {eos}};
  sched_driver d(o, vocab, ahead);
  std::mt19937_64 rng(seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  // A few shared "system prompts" of various lengths.
  std::vector<std::vector<token_id>> prefixes;
  for (int i = 0; i < 6; ++i) {
    std::vector<token_id> p(static_cast<size_t>(uni(0, 90)));
    for (auto& t : p)
      t = uni(1, vocab - 1);
    prefixes.push_back(std::move(p));
  }
  struct spec {
    std::vector<token_id> prompt;
    int32_t max_tokens, min_tokens;
  };
  std::map<seq_id, spec> specs;
  std::set<seq_id> cancelled;
  int added = 0, steps = 0;
  auto cancel_random = [&] {
    auto ids = d.sched.unfinished();
    if (ids.empty())
      return;
    auto id = ids[static_cast<size_t>(uni(0, static_cast<int>(ids.size()) - 1))];
    REQUIRE(d.sched.cancel(id).has_value());
    cancelled.insert(id);
  };
  while (added < c.num_requests || d.sched.has_unfinished()) {
    REQUIRE(++steps < 200000);
    for (int k = uni(0, 3); k > 0 && added < c.num_requests; --k, ++added) {
      auto prompt = prefixes[static_cast<size_t>(uni(0, 5))];
      for (int n = uni(1, 60); n > 0; --n)
        prompt.push_back(uni(1, vocab - 1));
      sampling_params sp;
      sp.temperature = 0;
      sp.max_tokens = uni(1, 48);
      sp.min_tokens = uni(0, 3) == 0 ? uni(0, sp.max_tokens) : 0;
      auto id = d.add(prompt, sp);
      specs[id] = {prompt, sp.max_tokens, sp.min_tokens};
    }
    if (uni(0, 99) < 3)
      cancel_random();
    if (ahead) {
      if (uni(0, 99) < 2 && !d.queued.empty())
        cancel_random(); // while plans are outstanding
      d.step_ahead();
      continue;
    }
    d.schedule();
    if (uni(0, 99) < 2)
      cancel_random(); // while the step is in flight
    d.execute_and_update();
  }
  while (d.step_ahead()) // a plan made ahead for requests that ended meanwhile
    ;
  if (ahead)
    CHECK(d.continued > 0);
  const auto st = d.sched.stats();
  MESSAGE("steps " << steps << ", preemptions " << st.preemptions << ", prefix-hit tokens "
                   << st.prefix_hit_tokens << ", hit rate " << d.sched.pool().hit_rate()
                   << ", cancelled " << cancelled.size() << ", fed previous_sample "
                   << d.continued);
  CHECK(d.exec.errors == 0);
  CHECK(d.sched.pool().num_free() == c.num_blocks); // nothing leaked
  CHECK(static_cast<int>(d.req.size()) == c.num_requests);
  for (const auto& [id, rec] : d.req) {
    CAPTURE(id);
    REQUIRE(rec.finishes == 1);
    if (cancelled.count(id)) {
      CHECK(rec.finish == finish_reason::cancelled);
      continue;
    }
    const auto& s = specs.at(id);
    auto alone = test::fake_alone(s.prompt, s.max_tokens, vocab, eos, s.min_tokens, 400);
    CHECK(rec.output == alone);
    CHECK(rec.finish == (alone.back() == eos ? finish_reason::stop : finish_reason::length));
  }
  if (c.prefix_caching) {
    CHECK(st.prefix_hit_tokens > 0);
    CHECK(d.sched.pool().stats().hits > 0);
  } else {
    CHECK(st.prefix_hit_tokens == 0);
  }
}

} // namespace

TEST_CASE("scheduler simulation: prefix caching, ample pool") {
  const sim_config c{.num_blocks = 2048,
                     .block_size = 16,
                     .budget = 256,
                     .max_seqs = 32,
                     .prefix_caching = true,
                     .num_requests = 1500};
  SUBCASE("one plan at a time") {
    simulate(c, 1, false);
  }
  SUBCASE("planned ahead") {
    simulate(c, 1, true);
  }
}

TEST_CASE("scheduler simulation: prefix caching, small pool forces preemption") {
  const sim_config c{.num_blocks = 96,
                     .block_size = 8,
                     .budget = 128,
                     .max_seqs = 24,
                     .prefix_caching = true,
                     .num_requests = 1500};
  SUBCASE("one plan at a time") {
    simulate(c, 2, false);
  }
  SUBCASE("planned ahead") {
    simulate(c, 2, true);
  }
}

TEST_CASE("scheduler simulation: no prefix caching, tiny blocks, small pool") {
  const sim_config c{.num_blocks = 200,
                     .block_size = 2,
                     .budget = 64,
                     .max_seqs = 16,
                     .prefix_caching = false,
                     .num_requests = 1000};
  SUBCASE("one plan at a time") {
    simulate(c, 3, false);
  }
  SUBCASE("planned ahead") {
    simulate(c, 3, true);
  }
}
