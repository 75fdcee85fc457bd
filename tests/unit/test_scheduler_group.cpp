// Parallel sampling (scheduler::add_group, OpenAI `n`): the choices of one prompt compute its
// shared full blocks once and reference them; each computes only the rest of the prompt into
// blocks of its own. Checked against the fake executor, which verifies every KV slot a step reads,
// with and without prefix caching, under cancellation and preemption.
#include <doctest/doctest.h>

#include "engine/scheduler/engine_loop.hpp"
#include "sched_driver.hpp"

using namespace troupe;
using namespace troupe::engine;
using troupe::test::greedy;

namespace {

constexpr int32_t vocab = 1000;

std::vector<token_id> prompt_of(int32_t n) {
  std::vector<token_id> p;
  for (int32_t i = 0; i < n; ++i)
    p.push_back(100 + i * 7 % 300);
  return p;
}

std::vector<seq_id> add_group(test::sched_driver& d, const std::vector<token_id>& prompt, int n,
                              sampling_params sp) {
  std::vector<request> rs(static_cast<size_t>(n), request{.prompt = prompt, .sampling = sp});
  auto ids = d.sched.add_group(std::move(rs));
  REQUIRE_MESSAGE(ids.has_value(), (ids ? "" : ids.error().to_string()));
  for (seq_id id : *ids)
    d.req[id] = {.tokens = prompt, .num_prompt = static_cast<int32_t>(prompt.size())};
  return *ids;
}

// What one step's plan computes, checked: prompt tokens fed, and that every block a step writes
// is its sequence's own (a shared block is never written).
struct plan_figures {
  int64_t prompt_tokens = 0;
  int32_t max_blocks_used = 0;
  int32_t full_decode_steps = 0; // steps with every choice decoding (blocks checked there)
};

void account(test::sched_driver& d, plan_figures& f, size_t n, int32_t shared_blocks) {
  const auto& o = d.sched.options();
  const auto& pool = d.sched.pool();
  int32_t decoding = 0;
  int32_t own = 0;
  for (const auto& s : d.plan.seqs) {
    const int32_t end = s.start_pos + static_cast<int32_t>(s.tokens.size());
    f.prompt_tokens += std::max(0, std::min(end, s.num_prompt_tokens) - s.start_pos);
    for (int32_t b = s.start_pos / o.block_size; b <= (end - 1) / o.block_size; ++b)
      CHECK_MESSAGE(pool.ref_count(s.block_table[static_cast<size_t>(b)] - o.block_offset) == 1,
                    "sequence " << s.id << " writes shared block " << s.block_table[b]);
    if (s.start_pos >= s.num_prompt_tokens) {
      ++decoding;
      own += static_cast<int32_t>(s.block_table.size()) - shared_blocks;
      for (int32_t b = 0; b < shared_blocks; ++b) // the same physical blocks in every table
        CHECK(s.block_table[static_cast<size_t>(b)] == d.plan.seqs[0].block_table[b]);
    }
  }
  const int32_t used = pool.num_blocks() - pool.num_free();
  f.max_blocks_used = std::max(f.max_blocks_used, used);
  if (decoding == static_cast<int32_t>(n) && d.plan.seqs.size() == n) {
    ++f.full_decode_steps;
    CHECK(used == shared_blocks + own); // shared prompt blocks + each choice's own
  }
}

plan_figures run(test::sched_driver& d, size_t n, int32_t shared_blocks) {
  plan_figures f;
  for (int i = 0; d.sched.has_unfinished(); ++i) {
    REQUIRE(i < 10000);
    d.schedule();
    account(d, f, n, shared_blocks);
    d.execute_and_update();
  }
  return f;
}

std::vector<token_id> alone(scheduler_options o, const std::vector<token_id>& prompt,
                            int32_t max_tokens) {
  test::sched_driver d(o, vocab);
  auto id = d.add(prompt, greedy(max_tokens));
  d.run();
  return d.req[id].output;
}

} // namespace

TEST_CASE("scheduler group: n choices compute the prompt's full blocks once and share them") {
  for (bool caching : {false, true}) {
    CAPTURE(caching);
    scheduler_options o{.num_blocks = 64,
                        .block_size = 4,
                        .prefix_caching = caching,
                        .max_num_batched_tokens = 64,
                        .max_num_seqs = 8,
                        .max_model_len = 64};
    const auto prompt = prompt_of(14); // 3 full blocks shared, 2 tokens per choice
    const auto want = alone(o, prompt, 6);

    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(6));
    const auto f = run(d, 4, 3);
    MESSAGE("n=4, 14-token prompt, block 4: prompt tokens computed "
            << f.prompt_tokens << ", max blocks in use " << f.max_blocks_used);
    CHECK(f.prompt_tokens == 14 + 3 * 2); // one prompt, then each other choice's last block
    CHECK(f.full_decode_steps >= 4);
    CHECK(f.max_blocks_used == 3 + 4 * 2); // at 6 + 14 tokens: 2 blocks of its own each
    CHECK(d.sched.stats().shared_prompt_tokens == 3 * 12);
    for (seq_id id : ids) {
      CHECK(d.req[id].output == want);
      CHECK(d.req[id].finish == finish_reason::length);
    }
    CHECK(d.sched.pool().num_free() == o.num_blocks); // every block came back
    CHECK(d.exec.errors == 0);

    // Without a group, the four compute the whole prompt each (and hold their own copies).
    test::sched_driver apart(o, vocab);
    for (int i = 0; i < 4; ++i)
      apart.add(prompt, greedy(6));
    const auto g = run(apart, 4, 0);
    CHECK(g.prompt_tokens == 4 * 14);
    CHECK(g.max_blocks_used == 4 * 5);
  }
}

TEST_CASE("scheduler group: a prompt of one block has nothing to share") {
  scheduler_options o{.num_blocks = 64, .block_size = 4, .max_num_batched_tokens = 64};
  test::sched_driver d(o, vocab);
  const auto ids = add_group(d, prompt_of(4), 3, greedy(3));
  const auto f = run(d, 3, 0);
  CHECK(f.prompt_tokens == 3 * 4);
  CHECK(d.sched.stats().shared_prompt_tokens == 0);
  for (seq_id id : ids)
    CHECK(d.req[id].output.size() == 3);
}

TEST_CASE("scheduler group: the choices wait for a chunked prefill, then share it") {
  for (bool caching : {false, true}) {
    CAPTURE(caching);
    scheduler_options o{.num_blocks = 64,
                        .block_size = 4,
                        .prefix_caching = caching,
                        .max_num_batched_tokens = 8,
                        .max_num_seqs = 8,
                        .max_model_len = 64};
    const auto prompt = prompt_of(30); // 7 full blocks shared, 2 tokens per choice
    const auto want = alone(o, prompt, 5);
    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(5));
    const auto f = run(d, 4, 7);
    CHECK(f.prompt_tokens == 30 + 3 * 2);
    CHECK(d.sched.stats().shared_prompt_tokens == 3 * 28);
    for (seq_id id : ids)
      CHECK(d.req[id].output == want);
    CHECK(d.sched.pool().num_free() == o.num_blocks);
  }
}

TEST_CASE("scheduler group: cancelling one choice, the prefilling one, or all") {
  scheduler_options o{.num_blocks = 64,
                      .block_size = 4,
                      .prefix_caching = false,
                      .max_num_batched_tokens = 64,
                      .max_num_seqs = 8,
                      .max_model_len = 64};
  const auto prompt = prompt_of(14);
  const auto want = alone(o, prompt, 6);

  SUBCASE("one choice while all decode: the others go on over the shared blocks") {
    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(6));
    for (int i = 0; i < 3; ++i) { // prefill, the others' last blocks, a decode
      d.schedule();
      d.execute_and_update();
    }
    const int32_t shared_block = d.plan.seqs.at(0).block_table.at(0);
    CHECK(d.sched.pool().ref_count(shared_block) == 4);
    REQUIRE(d.sched.cancel(ids[1]).has_value());
    CHECK(d.sched.pool().ref_count(shared_block) == 3);
    run(d, 3, 3);
    CHECK(d.req[ids[1]].finish == finish_reason::cancelled);
    for (seq_id id : {ids[0], ids[2], ids[3]}) {
      CHECK(d.req[id].output == want);
      CHECK(d.req[id].finish == finish_reason::length);
    }
    CHECK(d.sched.pool().num_free() == o.num_blocks);
  }
  SUBCASE("the prefilling choice while the others wait for it: one of them prefills instead") {
    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(6));
    d.schedule();
    REQUIRE(d.plan.seqs.size() == 1); // the first prefills, the others wait
    CHECK(d.plan.seqs[0].id == ids[0]);
    CHECK(d.sched.stats().num_waiting == 3);
    REQUIRE(d.sched.cancel(ids[0]).has_value());
    d.execute_and_update();
    const auto f = run(d, 3, 3);
    CHECK(f.prompt_tokens == 14 + 2 * 2);
    CHECK(d.req[ids[0]].finish == finish_reason::cancelled);
    for (seq_id id : {ids[1], ids[2], ids[3]})
      CHECK(d.req[id].output == want);
    CHECK(d.sched.pool().num_free() == o.num_blocks);
  }
  SUBCASE("every choice, in every state") {
    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(6));
    d.schedule();
    d.execute_and_update(); // the first ran its prefill; the others fork from it
    for (seq_id id : ids)
      REQUIRE(d.sched.cancel(id).has_value());
    d.outs.clear();
    d.sched.take_pending(d.outs);
    d.absorb();
    for (seq_id id : ids)
      CHECK(d.req[id].finish == finish_reason::cancelled);
    CHECK(!d.sched.has_unfinished());
    CHECK(!d.sched.has_work());
    CHECK(d.sched.pool().num_free() == o.num_blocks);
  }
}

TEST_CASE("scheduler group: preempted choices release only their references") {
  for (bool caching : {false, true}) {
    CAPTURE(caching);
    // 10 blocks of 4: the four choices of a 14-token prompt growing to 26 tokens need 3 shared +
    // 4 x 4 of their own, so some are preempted (and fork again when they come back).
    scheduler_options o{.num_blocks = 10,
                        .block_size = 4,
                        .prefix_caching = caching,
                        .max_num_batched_tokens = 16,
                        .max_num_seqs = 4,
                        .max_model_len = 64};
    const auto prompt = prompt_of(14);
    const auto want = alone(o, prompt, 12);
    test::sched_driver d(o, vocab);
    const auto ids = add_group(d, prompt, 4, greedy(12));
    const auto f = run(d, 4, 3);
    const auto st = d.sched.stats();
    MESSAGE("preemptions " << st.preemptions << ", shared prompt tokens " << st.shared_prompt_tokens
                           << ", prompt tokens computed " << f.prompt_tokens);
    CHECK(st.preemptions > 0);
    CHECK(st.shared_prompt_tokens > 0);
    for (seq_id id : ids) {
      CHECK(d.req[id].output == want);
      CHECK(d.req[id].finish == finish_reason::length);
    }
    CHECK(d.exec.errors == 0);
    CHECK(d.sched.pool().num_free() == o.num_blocks);
  }
}

TEST_CASE("scheduler group: invalid groups are refused") {
  scheduler_options o{.num_blocks = 64, .block_size = 4, .max_waiting = 4};
  scheduler s(o);
  CHECK(s.add_group({}).error().code() == errc::invalid_argument);
  std::vector<request> two{{.prompt = {1, 2, 3}}, {.prompt = {1, 2, 4}}};
  CHECK(s.add_group(two).error().code() == errc::invalid_argument);
  std::vector<request> five(5, request{.prompt = {1, 2, 3}});
  CHECK(s.add_group(five).error().code() == errc::resource_exhausted); // max_waiting
  std::vector<request> handoff(2, request{.prompt = {1, 2, 3}, .handoff = kv_handoff::export_kv});
  CHECK(s.add_group(handoff).error().code() == errc::invalid_argument);
  CHECK(!s.has_unfinished());
}

TEST_CASE("scheduler group: every choice lands in one lane of a pipelined engine") {
  scheduler_options o{.num_blocks = 64, .block_size = 4, .max_model_len = 32};
  engine_loop loop(o, 2);
  REQUIRE(loop.num_lanes() == 2);
  REQUIRE(loop.add_request({.prompt = prompt_of(9)}).has_value()); // lane 0 is busier now
  auto ids = loop.add_group(std::vector<request>(4, request{.prompt = prompt_of(9)}));
  REQUIRE(ids.has_value());
  for (seq_id id : *ids)
    CHECK((id - 1) % 2 == 1);
  CHECK(loop.sched(1).stats().num_waiting == 4);
}
