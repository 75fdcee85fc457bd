// Scheduling decisions, one at a time: budget, chunked prefill, decode first, preemption
// order, cancel in every state, queue bound, parameter validation, finish reasons, prefix reuse.
#include <doctest/doctest.h>

#include "sched_driver.hpp"

using namespace troupe;
using namespace troupe::engine;
using troupe::test::greedy;
using troupe::test::iota_tokens;
using troupe::test::sched_driver;

namespace {
constexpr int32_t vocab = 500;
scheduler_options small(int32_t num_blocks = 64, int32_t budget = 64) {
  return {.num_blocks = num_blocks,
          .block_size = 4,
          .prefix_caching = true,
          .max_num_batched_tokens = budget,
          .max_num_seqs = 8,
          .max_waiting = 16,
          .max_model_len = 256,
          .vocab_size = vocab,
          .eos_token_ids = {0}};
}
} // namespace

TEST_CASE("scheduler: a long prompt is prefilled in budget-sized chunks, logits only at the end") {
  sched_driver d(small(64, 10), vocab);
  auto id = d.add(iota_tokens(25), greedy(2));
  std::vector<int32_t> starts, sizes;
  std::vector<logits_mode> modes;
  for (int i = 0; i < 3; ++i) {
    const auto& p = d.schedule();
    REQUIRE(p.seqs.size() == 1);
    starts.push_back(p.seqs[0].start_pos);
    sizes.push_back(static_cast<int32_t>(p.seqs[0].tokens.size()));
    modes.push_back(p.seqs[0].logits);
    CHECK(p.seqs[0].first_step == (i == 0));
    CHECK(p.seqs[0].num_prompt_tokens == 25);
    CHECK(static_cast<int32_t>(p.seqs[0].block_table.size()) * 4 >= starts.back() + sizes.back());
    d.execute_and_update();
  }
  CHECK(starts == std::vector<int32_t>{0, 10, 20});
  CHECK(sizes == std::vector<int32_t>{10, 10, 5});
  CHECK(modes == std::vector<logits_mode>{logits_mode::none, logits_mode::none, logits_mode::last});
  CHECK(d.req[id].output.size() == 1);
  d.run();
  CHECK(d.req[id].finish == finish_reason::length);
  CHECK(d.req[id].output == test::fake_alone(iota_tokens(25), 2, vocab, -1, 0, 256));
}

TEST_CASE("scheduler: running decodes go first, the rest of the budget goes to prefill") {
  sched_driver d(small(64, 8), vocab);
  auto a = d.add(iota_tokens(3), greedy(10));
  d.step(); // a prefilled, one token out
  auto b = d.add(iota_tokens(20, 100), greedy(3));
  const auto& p = d.schedule();
  REQUIRE(p.seqs.size() == 2);
  CHECK(p.seqs[0].id == a);
  CHECK(p.seqs[0].tokens.size() == 1);
  CHECK(p.seqs[1].id == b);
  CHECK(p.seqs[1].tokens.size() == 7);
  CHECK(p.num_tokens() == 8);
  d.execute_and_update();
  d.run();
  CHECK(d.req[a].output == test::fake_alone(iota_tokens(3), 10, vocab, -1, 0, 256));
  CHECK(d.req[b].output == test::fake_alone(iota_tokens(20, 100), 3, vocab, -1, 0, 256));
}

TEST_CASE("scheduler: max_num_seqs caps the running set, the rest waits in order") {
  auto o = small(256, 1000);
  o.max_num_seqs = 3;
  sched_driver d(o, vocab);
  std::vector<seq_id> ids;
  for (int i = 0; i < 5; ++i)
    ids.push_back(d.add(iota_tokens(5, 10 * i + 1), greedy(4)));
  const auto& p = d.schedule();
  REQUIRE(p.seqs.size() == 3);
  for (int i = 0; i < 3; ++i)
    CHECK(p.seqs[i].id == ids[i]);
  CHECK(d.sched.stats().num_waiting == 2);
  d.execute_and_update();
  d.run();
  for (auto id : ids)
    CHECK(d.req[id].finishes == 1);
}

TEST_CASE("scheduler: out of blocks, the newest running sequence is preempted and recomputed") {
  // 6 blocks of 4 tokens: three sequences of 7 prompt tokens (2 blocks each) fill the pool.
  sched_driver d(small(6, 64), vocab);
  auto a = d.add(iota_tokens(7, 1), greedy(6));
  auto b = d.add(iota_tokens(7, 50), greedy(6));
  auto c = d.add(iota_tokens(7, 100), greedy(6));
  d.step(); // all three prefilled: 6 blocks used
  CHECK(d.sched.pool().num_free() == 0);
  d.step(); // each fed its 8th token: still fits
  // Next decode needs a third block for a: c (the newest) is preempted, then b.
  const auto& p = d.schedule();
  CHECK(std::find(p.finished.begin(), p.finished.end(), c) != p.finished.end());
  REQUIRE(!p.seqs.empty());
  CHECK(p.seqs[0].id == a);
  CHECK(d.sched.stats().preemptions >= 1);
  for (const auto& s : p.seqs)
    CHECK(s.id != c);
  d.execute_and_update();
  d.run();
  for (auto id : {a, b, c}) {
    CHECK(d.req[id].finishes == 1);
    CHECK(d.req[id].output.size() == 6);
  }
  // Recompute gives the same tokens as running alone.
  CHECK(d.req[c].output == test::fake_alone(iota_tokens(7, 100), 6, vocab, -1, 0, 256));
  CHECK(d.req[b].output == test::fake_alone(iota_tokens(7, 50), 6, vocab, -1, 0, 256));
}

TEST_CASE("scheduler: a preempted sequence comes back with first_step and its whole history") {
  sched_driver d(small(6, 64), vocab);
  d.add(iota_tokens(7, 1), greedy(6));
  d.add(iota_tokens(7, 50), greedy(6));
  auto c = d.add(iota_tokens(7, 100), greedy(6));
  d.step();
  d.step();
  int resumed = 0;
  while (d.sched.has_unfinished()) {
    const auto& p = d.schedule();
    for (const auto& s : p.seqs)
      if (s.id == c && s.first_step && d.req[c].output.size() > 0) {
        ++resumed;
        CHECK(s.start_pos + s.tokens.size() == d.req[c].tokens.size()); // prompt + outputs
        CHECK(s.num_prompt_tokens == 7);
      }
    d.execute_and_update();
  }
  CHECK(resumed >= 1);
}

TEST_CASE("scheduler: cancel in every state") {
  sched_driver d(small(64, 8), vocab);
  auto waiting = d.add(iota_tokens(30), greedy(5));
  auto behind = d.add(iota_tokens(5, 200), greedy(5));
  SUBCASE("waiting") {
    REQUIRE(d.sched.cancel(behind).has_value());
    d.step();
    CHECK(d.req[behind].finish == finish_reason::cancelled);
    CHECK(d.req[behind].output.empty());
  }
  SUBCASE("running, mid-prefill, between steps") {
    d.step();
    REQUIRE(d.sched.cancel(waiting).has_value());
    const auto& p = d.schedule();
    CHECK(std::find(p.finished.begin(), p.finished.end(), waiting) != p.finished.end());
    for (const auto& s : p.seqs)
      CHECK(s.id != waiting);
    d.execute_and_update();
    CHECK(d.req[waiting].finish == finish_reason::cancelled);
  }
  SUBCASE("in flight: after schedule, before update") {
    d.schedule();
    REQUIRE(d.sched.cancel(waiting).has_value());
    d.execute_and_update(); // its output is dropped, its blocks are already free
    CHECK(d.req[waiting].finish == finish_reason::cancelled);
    CHECK(d.req[waiting].output.empty());
  }
  SUBCASE("decoding") {
    for (int i = 0; i < 6; ++i)
      d.step();
    REQUIRE(d.req[waiting].output.size() >= 1);
    REQUIRE(d.req[waiting].finishes == 0);
    REQUIRE(d.sched.cancel(waiting).has_value());
    d.step();
    CHECK(d.req[waiting].finish == finish_reason::cancelled);
  }
  SUBCASE("finished or unknown: not_found") {
    d.run();
    auto r = d.sched.cancel(waiting);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code() == errc::not_found);
    CHECK_FALSE(d.sched.cancel(12345).has_value());
  }
  d.run();
  CHECK(d.req[waiting].finishes == 1);
  CHECK(d.req[behind].finishes == 1);
  CHECK(d.sched.pool().num_free() == d.sched.pool().num_blocks());
}

TEST_CASE("scheduler: the waiting queue is bounded and says so") {
  auto o = small();
  o.max_waiting = 2;
  scheduler s(o);
  REQUIRE(s.add({.prompt = {1, 2}}).has_value());
  REQUIRE(s.add({.prompt = {1, 2}}).has_value());
  auto r = s.add({.prompt = {1, 2}});
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code() == errc::resource_exhausted);
  CHECK(r.error().message().find("waiting queue is full") != std::string::npos);
}

TEST_CASE("scheduler: invalid requests are rejected with the parameter's name") {
  scheduler s(small());
  auto expect_error = [&](request r, const char* name) {
    auto id = s.add(std::move(r));
    REQUIRE_FALSE(id.has_value());
    CHECK(id.error().code() == errc::invalid_argument);
    CHECK_MESSAGE(id.error().message().find(name) != std::string::npos, id.error().message());
  };
  auto with = [](auto f) {
    request r{.prompt = {1, 2, 3}};
    f(r.sampling);
    return r;
  };
  expect_error(with([](auto& p) { p.temperature = -0.5f; }), "temperature");
  expect_error(with([](auto& p) { p.top_p = 0.0f; }), "top_p");
  expect_error(with([](auto& p) { p.top_p = 1.5f; }), "top_p");
  expect_error(with([](auto& p) { p.top_k = -2; }), "top_k");
  expect_error(with([](auto& p) { p.min_p = 2.0f; }), "min_p");
  expect_error(with([](auto& p) { p.repetition_penalty = 0.0f; }), "repetition_penalty");
  expect_error(with([](auto& p) { p.presence_penalty = 3.0f; }), "presence_penalty");
  expect_error(with([](auto& p) { p.frequency_penalty = -3.0f; }), "frequency_penalty");
  expect_error(with([](auto& p) { p.max_tokens = 0; }), "max_tokens");
  expect_error(with([](auto& p) { p.min_tokens = 100; }), "min_tokens");
  expect_error(with([](auto& p) { p.logprobs = 50; }), "logprobs");
  expect_error(request{}, "prompt");
  expect_error(request{.prompt = {1, vocab}}, "vocabulary");
  expect_error(request{.prompt = iota_tokens(256)}, "max_model_len");
  expect_error(request{.prompt = {1}, .stop_token_ids = {-1}}, "stop_token_ids");
  CHECK(s.stats().num_waiting == 0);
}

TEST_CASE("scheduler: finish reasons") {
  sched_driver d(small(), vocab);
  const auto prompt = iota_tokens(5);
  const auto alone = test::fake_alone(prompt, 20, vocab, -1, 0, 256);
  auto o = d.sched.options();
  SUBCASE("stop_token_ids: stop, with the token") {
    sampling_params p = greedy(20);
    auto id = d.add(prompt, p, {alone[3]});
    d.run();
    CHECK(d.req[id].finish == finish_reason::stop);
    CHECK(d.req[id].stop_token == alone[3]);
    CHECK(d.req[id].output == std::vector<token_id>(alone.begin(), alone.begin() + 4));
  }
  SUBCASE("min_tokens bans stop tokens until reached") {
    sampling_params p = greedy(20);
    p.min_tokens = 5;
    auto id = d.add(prompt, p, {alone[0]});
    d.run();
    CHECK(d.req[id].output.size() >= 5);
    CHECK(d.req[id].output[0] != alone[0]);
  }
  SUBCASE("max_tokens: length") {
    auto id = d.add(prompt, greedy(7));
    d.run();
    CHECK(d.req[id].finish == finish_reason::length);
    CHECK(d.req[id].output == std::vector<token_id>(alone.begin(), alone.begin() + 7));
  }
  SUBCASE("context limit: length") {
    auto id = d.add(iota_tokens(250), greedy(100));
    d.run();
    CHECK(d.req[id].finish == finish_reason::length);
    CHECK(d.req[id].tokens.size() == 256);
  }
  SUBCASE("EOS stops unless ignore_eos") {
    // Find a prompt whose greedy chain hits the EOS id 0 soon: make 0 an EOS-like stop via
    // the model's eos list by choosing the EOS id as the chain's 2nd token.
    auto o2 = small();
    o2.eos_token_ids = {alone[1]};
    sched_driver e(o2, vocab);
    sampling_params p = greedy(20);
    p.ignore_eos = false;
    auto id = e.add(prompt, p);
    auto ignoring = e.add(prompt, greedy(20));
    e.run();
    CHECK(e.req[id].finish == finish_reason::stop);
    CHECK(e.req[id].stop_token == alone[1]);
    CHECK(e.req[id].output.size() == 2);
    CHECK(e.req[ignoring].finish == finish_reason::length);
    CHECK(e.req[ignoring].output.size() == 20);
  }
  (void)o;
}

TEST_CASE("scheduler: a shared prefix is served from cached blocks") {
  sched_driver d(small(64, 64), vocab);
  auto system = iota_tokens(9, 300); // two full blocks of 4, plus one token
  auto p1 = system, p2 = system;
  p1.push_back(7);
  p2.push_back(8);
  auto a = d.add(p1, greedy(3));
  d.step();
  const auto a_blocks = d.plan.seqs[0].block_table;
  auto b = d.add(p2, greedy(3));
  const auto& p = d.schedule();
  const seq_step* sb = nullptr;
  for (const auto& s : p.seqs)
    if (s.id == b)
      sb = &s;
  REQUIRE(sb != nullptr);
  CHECK(sb->start_pos == 8);
  CHECK(sb->tokens == std::vector<token_id>{300 + 8, 8});
  CHECK(sb->block_table[0] == a_blocks[0]);
  CHECK(sb->block_table[1] == a_blocks[1]);
  CHECK(d.sched.pool().ref_count(a_blocks[0]) == 2);
  d.execute_and_update();
  d.run();
  CHECK(d.sched.stats().prefix_hit_tokens == 8);
  CHECK(d.req[b].output == test::fake_alone(p2, 3, vocab, -1, 0, 256));
  CHECK(d.req[a].output == test::fake_alone(p1, 3, vocab, -1, 0, 256));
}

TEST_CASE("scheduler: requests without a seed get distinct ones, given seeds are kept") {
  scheduler s(small());
  sampling_params seeded;
  seeded.has_seed = true;
  seeded.seed = 42;
  REQUIRE(s.add({.prompt = {1}}).has_value());
  REQUIRE(s.add({.prompt = {2}}).has_value());
  REQUIRE(s.add({.prompt = {3}, .sampling = seeded}).has_value());
  auto p = s.schedule();
  REQUIRE(p.seqs.size() == 3);
  for (const auto& st : p.seqs)
    CHECK(st.sampling.has_seed);
  CHECK(p.seqs[0].sampling.seed != p.seqs[1].sampling.seed);
  CHECK(p.seqs[2].sampling.seed == 42);
}

TEST_CASE("scheduler: option sets that cannot work are rejected by name") {
  CHECK(validate(small()).has_value());
  auto o = small();
  o.block_size = 0;
  CHECK(validate(o).error().message().find("block_size") != std::string::npos);
  o = small();
  o.max_num_batched_tokens = 4; // < max_num_seqs = 8
  CHECK(validate(o).error().message().find("max_num_batched_tokens") != std::string::npos);
}
