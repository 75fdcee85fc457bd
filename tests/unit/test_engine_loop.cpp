// The synchronous engine loop over the fake executor: deltas per step, cancellation outputs,
// executor failures surfaced with the step, fail_all() ending everything; with a pipelined
// executor, lanes with one plan each in flight; plan()/complete() driven as the replica actor
// does, results in any lane order.
#include <algorithm>
#include <map>
#include <set>

#include <doctest/doctest.h>

#include "engine/scheduler/engine_loop.hpp"
#include "fake_executor.hpp"
#include "pipelined_executor.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {
struct fixture {
  std::map<seq_id, std::vector<token_id>> hist;
  test::fake_executor exec{32, 4, 100, [this](seq_id id) -> const std::vector<token_id>* {
                             auto it = hist.find(id);
                             return it == hist.end() ? nullptr : &it->second;
                           }};
  engine_loop loop{
      {.num_blocks = 32, .block_size = 4, .max_num_batched_tokens = 16, .vocab_size = 100}, exec};
  seq_id add(std::vector<token_id> prompt, int32_t max_tokens) {
    return add_to(loop, std::move(prompt), max_tokens);
  }
  seq_id add_to(engine_loop& l, std::vector<token_id> prompt, int32_t max_tokens) {
    sampling_params p;
    p.temperature = 0;
    p.max_tokens = max_tokens;
    auto id = l.add_request({.prompt = prompt, .sampling = p});
    REQUIRE(id.has_value());
    hist[*id] = prompt;
    return *id;
  }
  std::vector<request_output> step() { return step_of(loop); }
  std::vector<request_output> step_of(engine_loop& l) {
    auto r = l.step();
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
    for (const auto& o : *r)
      if (o.has_token)
        hist[o.id].push_back(o.token);
    return *r;
  }
};
} // namespace

TEST_CASE("engine_loop: one delta per running request per step, then the finish") {
  fixture f;
  auto a = f.add({1, 2, 3}, 3);
  f.add({4, 5}, 2);
  int tokens_a = 0, tokens_b = 0, finishes = 0;
  for (int i = 0; i < 10 && f.loop.has_unfinished(); ++i)
    for (const auto& o : f.step()) {
      (o.id == a ? tokens_a : tokens_b) += o.has_token;
      finishes += o.finish != finish_reason::none;
    }
  CHECK(tokens_a == 3);
  CHECK(tokens_b == 2);
  CHECK(finishes == 2);
  CHECK(f.step().empty()); // nothing left: an empty step
}

TEST_CASE("engine_loop: cancelling everything reports each once and frees the pool") {
  fixture f;
  auto a = f.add({1, 2, 3}, 50);
  auto b = f.add({4, 5, 6, 7, 8, 9}, 50);
  f.step();
  REQUIRE(f.loop.cancel(a).has_value());
  REQUIRE(f.loop.cancel(b).has_value());
  auto out = f.step(); // an empty plan whose `finished` names both
  REQUIRE(out.size() == 2);
  for (const auto& o : out)
    CHECK(o.finish == finish_reason::cancelled);
  CHECK_FALSE(f.loop.has_unfinished());
  CHECK(f.loop.sched().pool().num_free() == 32);
}

TEST_CASE("engine_loop: an executor failure names the step, fail_all ends every request") {
  fixture f;
  f.add({1, 2, 3}, 50);
  f.add({4, 5}, 50);
  f.step();
  f.exec.fail_next = true;
  auto r = f.loop.step();
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code() == errc::unavailable);
  CHECK(r.error().message().find("step 2") != std::string::npos);
  CHECK_FALSE(f.loop.step().has_value()); // refuses until fail_all()
  auto ended = f.loop.fail_all();
  CHECK(ended.size() == 2);
  CHECK_FALSE(f.loop.has_unfinished());
  CHECK(f.loop.sched().pool().num_free() == 32);
  auto c = f.loop.sched().check();
  CHECK(c.has_value());
  f.add({7, 8}, 2); // usable again
  for (int i = 0; i < 5 && f.loop.has_unfinished(); ++i)
    f.step();
  CHECK_FALSE(f.loop.has_unfinished());
}

namespace {
// Two lanes over the fixture's fake model: a pipeline of two stages, 16 blocks a lane.
struct pipelined : fixture {
  test::pipelined_executor pipe{exec, 2};
  engine_loop piped{{.num_blocks = 32,
                     .block_size = 4,
                     .max_num_batched_tokens = 16,
                     .max_model_len = 32,
                     .vocab_size = 100},
                    pipe};
};
} // namespace

TEST_CASE("engine_loop, pipelined: two lanes, two plans in flight, every request as if alone") {
  pipelined f;
  REQUIRE(f.piped.num_lanes() == 2);
  std::map<seq_id, std::vector<token_id>> prompts, got;
  for (token_id t = 1; t <= 6; ++t) {
    std::vector<token_id> p(static_cast<size_t>(t + 2), t);
    prompts[f.add_to(f.piped, p, 9)] = p;
  }
  // Requests alternate between the lanes (the least loaded), which number them apart.
  std::set<size_t> lanes;
  for (const auto& [id, p] : prompts)
    lanes.insert((id - 1) % 2);
  CHECK(lanes.size() == 2);
  for (int i = 0; i < 200 && f.piped.has_unfinished(); ++i)
    for (const auto& o : f.step_of(f.piped))
      if (o.has_token)
        got[o.id].push_back(o.token);
  CHECK_FALSE(f.piped.has_unfinished());
  CHECK(f.pipe.max_in_flight == 2);
  CHECK(f.pipe.conflicts == 0);
  CHECK(f.exec.errors == 0);
  for (const auto& [id, p] : prompts) {
    CAPTURE(id);
    CHECK(got[id] == test::fake_alone(p, 9, 100, -1, 0, 32));
  }
  CHECK(f.piped.usage().blocks_used == 0);
  CHECK(f.piped.usage().num_blocks == 32);
  CHECK(f.piped.stats().finished == 6);
  for (size_t l = 0; l < 2; ++l)
    CHECK(f.piped.sched(l).check().has_value());
}

TEST_CASE("engine_loop, pipelined: one lane when a slice could not hold a full context") {
  fixture f;
  test::pipelined_executor pipe{f.exec, 2};
  engine_loop loop{{.num_blocks = 32,
                    .block_size = 4,
                    .max_num_batched_tokens = 16,
                    .max_model_len = 100,
                    .vocab_size = 100},
                   pipe};
  CHECK(loop.num_lanes() == 1); // 25 blocks a context, 16 a slice
  CHECK(loop.usage().num_blocks == 32);
}

TEST_CASE("engine_loop, pipelined: a failure with two plans in flight ends both lanes' requests") {
  pipelined f;
  f.add_to(f.piped, {1, 2, 3}, 50);
  f.add_to(f.piped, {4, 5}, 50);
  f.step_of(f.piped); // both lanes submitted, the first collected
  CHECK(f.piped.in_flight() == 1);
  f.exec.fail_next = true;
  auto r = f.piped.step();
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message().find("fake executor told to fail") != std::string::npos);
  auto ended = f.piped.fail_all();
  CHECK(ended.size() == 2);
  CHECK(f.piped.in_flight() == 0);
  CHECK_FALSE(f.piped.has_unfinished());
  CHECK(f.piped.usage().blocks_used == 0);
  f.add_to(f.piped, {7, 8}, 2); // usable again
  for (int i = 0; i < 5 && f.piped.has_unfinished(); ++i)
    f.step_of(f.piped);
  CHECK_FALSE(f.piped.has_unfinished());
}

TEST_CASE("engine_loop, pipelined: cancelling a request while its lane's plan is in flight") {
  pipelined f;
  auto a = f.add_to(f.piped, {1, 2, 3}, 50);
  auto b = f.add_to(f.piped, {4, 5}, 4);
  f.step_of(f.piped); // lane of `a` collected, lane of `b` in flight
  REQUIRE(f.piped.cancel(b).has_value());
  int cancelled = 0;
  for (int i = 0; i < 10; ++i)
    for (const auto& o : f.step_of(f.piped))
      cancelled += o.id == b && o.finish == finish_reason::cancelled;
  CHECK(cancelled == 1);
  CHECK(f.piped.cancel(a).has_value());
  f.step_of(f.piped);
  f.step_of(f.piped);
  CHECK_FALSE(f.piped.has_unfinished());
  CHECK(f.piped.usage().blocks_used == 0);
  CHECK(f.exec.errors == 0);
}

TEST_CASE("engine_loop: plan() and complete() as an actor drives them, results in any lane "
          "order") {
  fixture f;
  engine_loop loop{{.num_blocks = 32,
                    .block_size = 4,
                    .max_num_batched_tokens = 16,
                    .max_model_len = 32,
                    .vocab_size = 100},
                   2};
  REQUIRE(loop.num_lanes() == 2);
  std::map<seq_id, std::vector<token_id>> prompts, got;
  for (token_id t = 1; t <= 5; ++t) {
    std::vector<token_id> p(static_cast<size_t>(t + 1), t);
    prompts[f.add_to(loop, p, 7)] = p;
  }
  CHECK_FALSE(loop.step().has_value()); // no executor: plan()/complete() only
  bool newest_first = true;
  for (int i = 0; i < 100 && loop.has_unfinished(); ++i) {
    std::vector<request_output> out;
    auto started = loop.plan(out);
    REQUIRE(started.has_value());
    REQUIRE(loop.in_flight() <= 2);
    std::vector<engine_loop::started> order(started->begin(), started->end());
    if (newest_first) // the later lane's result first
      std::reverse(order.begin(), order.end());
    newest_first = !newest_first;
    for (const auto& [lane, plan] : order) {
      auto r = f.exec.execute(*plan);
      REQUIRE(r.has_value());
      REQUIRE(loop.complete(lane, *r, out).has_value());
    }
    CHECK_FALSE(loop.complete(0, {}, out).has_value()); // nothing in flight there
    for (const auto& o : out)
      if (o.has_token) {
        f.hist[o.id].push_back(o.token);
        got[o.id].push_back(o.token);
      }
  }
  CHECK_FALSE(loop.has_unfinished());
  CHECK(f.exec.errors == 0);
  for (const auto& [id, p] : prompts) {
    CAPTURE(id);
    CHECK(got[id] == test::fake_alone(p, 7, 100, -1, 0, 32));
  }
  CHECK(loop.usage().blocks_used == 0);
}
