// Test harness: a scheduler driving the fake executor, recording every request's token history
// and outputs, and checking per-step invariants (budget, no duplicates, one finish each).
#pragma once

#include <map>

#include "engine/scheduler/scheduler.hpp"
#include "fake_executor.hpp"

namespace troupe::test {

struct sched_driver {
  struct record {
    std::vector<token_id> tokens; // prompt + outputs, as reported
    std::vector<token_id> output;
    int32_t num_prompt = 0;
    int finishes = 0;
    engine::finish_reason finish = engine::finish_reason::none;
    token_id stop_token = -1;
  };

  engine::scheduler sched;
  int32_t vocab;
  std::map<seq_id, record> req;
  fake_executor exec;
  step_plan plan;
  std::vector<engine::request_output> outs;

  sched_driver(engine::scheduler_options o, int32_t vocab_size)
    : sched(o), vocab(vocab_size), exec(o.num_blocks, o.block_size, vocab_size,
                                        [this](seq_id id) -> const std::vector<token_id>* {
                                          auto it = req.find(id);
                                          return it == req.end() ? nullptr : &it->second.tokens;
                                        }) {}

  seq_id add(std::vector<token_id> prompt, sampling_params sp = {},
             std::vector<token_id> stop_ids = {}) {
    auto n = static_cast<int32_t>(prompt.size());
    auto id = sched.add({.prompt = prompt, .sampling = sp, .stop_token_ids = std::move(stop_ids)});
    REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().to_string()));
    req[*id] = {.tokens = std::move(prompt), .num_prompt = n};
    return *id;
  }

  // schedule() and its invariants; execute and update are separate so tests can interleave.
  const step_plan& schedule() {
    sched.schedule(plan);
    const auto& o = sched.options();
    CHECK(plan.num_tokens() <= o.max_num_batched_tokens);
    CHECK(static_cast<int32_t>(plan.seqs.size()) <= o.max_num_seqs);
    std::map<seq_id, int> seen;
    for (const auto& s : plan.seqs)
      CHECK(seen[s.id]++ == 0);
    return plan;
  }

  void execute_and_update() {
    auto r = exec.execute(plan);
    REQUIRE(r.has_value());
    outs.clear();
    auto u = sched.update(plan, *r, outs);
    REQUIRE_MESSAGE(u.has_value(), (u ? "" : u.error().to_string()));
    absorb();
  }

  void absorb() {
    for (const auto& o : outs) {
      auto& rec = req.at(o.id);
      CHECK(rec.finishes == 0); // nothing after a finish
      if (o.has_token) {
        rec.tokens.push_back(o.token);
        rec.output.push_back(o.token);
      }
      if (o.finish != engine::finish_reason::none) {
        ++rec.finishes;
        rec.finish = o.finish;
        rec.stop_token = o.stop_token;
      }
    }
    auto c = sched.check();
    REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  }

  void step() {
    schedule();
    execute_and_update();
  }

  void run(int max_steps = 100000) {
    for (int i = 0; i < max_steps && sched.has_unfinished(); ++i)
      step();
    REQUIRE_FALSE(sched.has_unfinished());
  }
};

inline std::vector<token_id> iota_tokens(int32_t n, token_id first = 1) {
  std::vector<token_id> v(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = first + i;
  return v;
}

} // namespace troupe::test
