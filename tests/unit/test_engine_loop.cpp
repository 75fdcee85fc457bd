// The synchronous engine loop over the fake executor: deltas per step, cancellation outputs,
// executor failures surfaced with the step, fail_all() ending everything.
#include <doctest/doctest.h>

#include "engine/scheduler/engine_loop.hpp"
#include "fake_executor.hpp"

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
    sampling_params p;
    p.temperature = 0;
    p.max_tokens = max_tokens;
    auto id = loop.add_request({.prompt = prompt, .sampling = p});
    REQUIRE(id.has_value());
    hist[*id] = prompt;
    return *id;
  }
  std::vector<request_output> step() {
    auto r = loop.step();
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

TEST_CASE("engine_loop: an executor failure names the step; fail_all ends every request") {
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
