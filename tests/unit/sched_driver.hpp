// Test harness: a scheduler driving the fake executor, recording every request's token history
// and outputs, and checking per-step invariants (budget, no duplicates, one finish each). With
// `ahead`, plans are made ahead as engine_loop does over an executor that overlaps: up to two
// outstanding, the executor's history then being what it fed and sampled (a token sampled for a
// sequence cancelled or ended meanwhile is fed by the plan made ahead, never reported).
#pragma once

#include <deque>
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
  bool ahead;
  std::map<seq_id, record> req;
  std::map<seq_id, std::vector<token_id>> fed; // ahead: prompt, then every token sampled
  fake_executor exec;
  step_plan plan;
  std::deque<step_plan> queued; // ahead: outstanding plans, oldest first
  size_t continued = 0;         // ahead: sequences fed previous_sample
  std::vector<engine::request_output> outs;

  sched_driver(engine::scheduler_options o, int32_t vocab_size, bool plan_ahead = false)
    : sched(o), vocab(vocab_size), ahead(plan_ahead),
      exec(o.num_blocks, o.block_size, vocab_size,
           [this](seq_id id) -> const std::vector<token_id>* {
             if (ahead) {
               auto it = fed.find(id);
               return it == fed.end() ? nullptr : &it->second;
             }
             auto it = req.find(id);
             return it == req.end() ? nullptr : &it->second.tokens;
           }) {}

  seq_id add(std::vector<token_id> prompt, sampling_params sp = {},
             std::vector<token_id> stop_ids = {}) {
    auto n = static_cast<int32_t>(prompt.size());
    auto id = sched.add({.prompt = prompt, .sampling = sp, .stop_token_ids = std::move(stop_ids)});
    REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().to_string()));
    fed[*id] = prompt;
    req[*id] = {.tokens = std::move(prompt), .num_prompt = n};
    return *id;
  }

  // schedule() and its invariants; execute and update are separate so tests can interleave.
  const step_plan& schedule() { return schedule_into(plan); }
  const step_plan& schedule_into(step_plan& p) {
    sched.schedule(p);
    check_plan(p);
    return p;
  }
  void check_plan(const step_plan& plan) {
    const auto& o = sched.options();
    CHECK(plan.num_tokens() <= o.max_num_batched_tokens);
    CHECK(static_cast<int32_t>(plan.seqs.size()) <= o.max_num_seqs);
    std::map<seq_id, int> seen;
    for (const auto& s : plan.seqs)
      CHECK(seen[s.id]++ == 0);
  }

  // Ahead: plans while the scheduler allows (up to two outstanding), then runs and updates the
  // oldest. False when nothing was outstanding.
  bool step_ahead() {
    while (queued.size() < 2 && (queued.empty() || sched.can_plan_ahead())) {
      step_plan p;
      schedule_into(p);
      if (p.seqs.empty() && p.finished.empty())
        break;
      for (const auto& s : p.seqs)
        continued += !s.tokens.empty() && s.tokens[0] == previous_sample;
      queued.push_back(std::move(p));
    }
    if (queued.empty())
      return false;
    auto r = exec.run(queued.front());
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
    for (const auto& o : r->outputs)
      if (o.token >= 0)
        fed[o.id].push_back(o.token);
    outs.clear();
    auto u = sched.update(queued.front(), *r, outs);
    REQUIRE_MESSAGE(u.has_value(), (u ? "" : u.error().to_string()));
    queued.pop_front();
    absorb();
    return true;
  }

  void execute_and_update() {
    auto r = exec.run(plan);
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

// Greedy, max_tokens tokens, EOS ignored.
inline sampling_params greedy(int32_t max_tokens) {
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  return p;
}

inline std::vector<token_id> iota_tokens(int32_t n, token_id first = 1) {
  std::vector<token_id> v(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = first + i;
  return v;
}

} // namespace troupe::test
