// Prefill/decode disaggregation in the scheduler: a prefill-side request keeps its blocks after
// its first token, a decode-side request reserves blocks (prefix cache included) and decodes
// from a handed-over first token; cancels, fallbacks and held blocks keep the pool consistent.
// The fake executors check every KV slot a step reads, so a transfer that missed a position fails.
#include <doctest/doctest.h>

#include "sched_driver.hpp"

using namespace troupe;
using namespace troupe::engine;
using troupe::test::greedy;
using troupe::test::iota_tokens;
using troupe::test::sched_driver;

namespace {
constexpr int32_t vocab = 500;
scheduler_options opts(int32_t block_size, int32_t num_blocks = 64) {
  return {.num_blocks = num_blocks,
          .block_size = block_size,
          .prefix_caching = true,
          .max_num_batched_tokens = 64,
          .max_num_seqs = 8,
          .max_waiting = 16,
          .max_model_len = 256,
          .vocab_size = vocab,
          .eos_token_ids = {0}};
}

// Adds an import request to the decode driver (its record holds the prompt).
seq_id add_import(sched_driver& d, const std::vector<token_id>& prompt, sampling_params sp) {
  auto id = d.sched.add({.prompt = prompt, .handoff = kv_handoff::import_kv, .sampling = sp});
  REQUIRE(id.has_value());
  d.req[*id] = {.tokens = prompt, .num_prompt = static_cast<int32_t>(prompt.size())};
  return *id;
}

// Prefills `prompt` on `p` (export), copies positions [from, n) of its KV into `r`'s blocks on
// `d`, and hands the first token over. Returns the prefill side's output.
request_output hand_off(sched_driver& p, sched_driver& d, const kv_reservation& r,
                        const std::vector<token_id>& prompt, sampling_params sp) {
  auto pid = p.sched.add({.prompt = prompt, .handoff = kv_handoff::export_kv, .sampling = sp});
  REQUIRE(pid.has_value());
  p.req[*pid] = {.tokens = prompt, .num_prompt = static_cast<int32_t>(prompt.size())};
  request_output exported;
  for (int i = 0; i < 100 && exported.finish == finish_reason::none; ++i) {
    p.step();
    for (const auto& o : p.outs)
      if (o.id == *pid)
        exported = o;
  }
  REQUIRE(exported.finish == finish_reason::handoff);
  REQUIRE(exported.has_token);
  CHECK(p.sched.stats().num_held == 1);
  const int32_t pbs = p.sched.options().block_size, dbs = d.sched.options().block_size;
  for (int32_t t = r.cached_tokens; t < static_cast<int32_t>(prompt.size()); ++t)
    d.exec.kv_slot(r.blocks[t / dbs], t % dbs) = p.exec.kv_slot(exported.blocks[t / pbs], t % pbs);
  REQUIRE(p.sched.release_held(*pid).has_value());
  CHECK(p.sched.stats().num_held == 0);
  d.outs.clear();
  auto ok = d.sched.finish_import(r.id, {.id = r.id, .token = exported.token}, d.outs);
  REQUIRE_MESSAGE(ok.has_value(), (ok ? "" : ok.error().to_string()));
  d.absorb();
  return exported;
}

kv_reservation reserve(sched_driver& d) {
  d.schedule(); // admits the import: reserves, computes nothing
  CHECK(d.plan.seqs.empty());
  d.execute_and_update();
  std::vector<kv_reservation> r;
  d.sched.take_reservations(r);
  REQUIRE(r.size() == 1);
  CHECK(d.sched.stats().num_importing == 1);
  return r.front();
}
} // namespace

TEST_CASE("handoff: prefill on one scheduler, decode on another, as if it ran alone") {
  for (auto [pbs, dbs] : {std::pair{4, 4}, {4, 16}, {16, 4}, {1, 8}}) {
    CAPTURE(pbs);
    CAPTURE(dbs);
    sched_driver p(opts(pbs), vocab), d(opts(dbs), vocab);
    const auto prompt = iota_tokens(21);
    const auto id = add_import(d, prompt, greedy(9));
    const auto r = reserve(d);
    CHECK(r.id == id);
    CHECK(r.cached_tokens == 0);
    CHECK(static_cast<int32_t>(r.blocks.size()) == (21 + dbs - 1) / dbs);
    hand_off(p, d, r, prompt, greedy(9));
    d.run();
    CHECK(d.req[id].output == test::fake_alone(prompt, 9, vocab, -1, 0, 256));
    CHECK(d.req[id].finish == finish_reason::length);
    CHECK(d.exec.errors == 0);
    CHECK(d.sched.pool().num_free() == d.sched.pool().num_blocks());
    CHECK(p.sched.pool().num_free() == p.sched.pool().num_blocks());
  }
}

TEST_CASE("handoff: the decode side reuses its prefix cache and is sent only the rest") {
  sched_driver p(opts(4), vocab), d(opts(4), vocab);
  const auto shared = iota_tokens(16);
  auto first = d.add(shared, greedy(2)); // computed on the decode side: 4 full blocks cached
  d.run();
  CHECK(d.req[first].output.size() == 2);
  auto prompt = shared;
  for (token_id t : iota_tokens(6, 100))
    prompt.push_back(t);
  const auto id = add_import(d, prompt, greedy(5));
  const auto r = reserve(d);
  CHECK(r.cached_tokens == 16);
  hand_off(p, d, r, prompt, greedy(5));
  d.run();
  CHECK(d.req[id].output == test::fake_alone(prompt, 5, vocab, -1, 0, 256));
  CHECK(d.exec.errors == 0);
}

TEST_CASE("handoff: a whole prompt in the decode side's cache needs no positions at all") {
  sched_driver p(opts(4), vocab), d(opts(4), vocab);
  const auto prompt = iota_tokens(12);
  auto first = d.add(prompt, greedy(1));
  d.run();
  const auto id = add_import(d, prompt, greedy(4));
  const auto r = reserve(d);
  CHECK(r.cached_tokens == 12);
  hand_off(p, d, r, prompt, greedy(4));
  d.run();
  CHECK(d.req[id].output == test::fake_alone(prompt, 4, vocab, -1, 0, 256));
  CHECK(d.req[first].finishes == 1);
}

TEST_CASE("handoff: a first token that ends the request ends it on the decode side") {
  sched_driver p(opts(4), vocab), d(opts(4), vocab);
  const auto prompt = iota_tokens(7);
  const auto id = add_import(d, prompt, greedy(1));
  const auto r = reserve(d);
  hand_off(p, d, r, prompt, greedy(1));
  CHECK(d.req[id].finish == finish_reason::length);
  CHECK(d.req[id].output.size() == 1);
  CHECK_FALSE(d.sched.has_unfinished());
  CHECK(d.sched.pool().num_free() == d.sched.pool().num_blocks());
}

TEST_CASE("handoff: a cancelled import holds its blocks until released, then frees them") {
  sched_driver d(opts(4), vocab);
  const auto id = add_import(d, iota_tokens(10), greedy(4));
  const auto r = reserve(d);
  const int32_t free_before = d.sched.pool().num_free();
  REQUIRE(d.sched.cancel(id).has_value());
  CHECK(d.sched.stats().num_importing == 0);
  CHECK(d.sched.stats().num_held == 1);
  CHECK(d.sched.pool().num_free() == free_before); // a transfer may still write them
  CHECK(d.sched.check().has_value());
  REQUIRE(d.sched.release_held(id).has_value());
  CHECK(d.sched.pool().num_free() == d.sched.pool().num_blocks());
  CHECK(d.sched.release_held(id).error().code() == errc::not_found);
  CHECK(d.sched.finish_import(r.id, {.token = 5}, d.outs).error().code() == errc::not_found);
}

TEST_CASE("handoff: a failed transfer falls back to prefilling on the decode side") {
  sched_driver d(opts(4), vocab);
  const auto prompt = iota_tokens(13);
  const auto id = add_import(d, prompt, greedy(6));
  reserve(d);
  REQUIRE(d.sched.prefill_locally(id).has_value());
  CHECK(d.sched.stats().num_importing == 0);
  CHECK(d.sched.prefill_locally(id).error().code() == errc::invalid_argument);
  d.run();
  CHECK(d.req[id].output == test::fake_alone(prompt, 6, vocab, -1, 0, 256));
  CHECK(d.exec.errors == 0);
}

TEST_CASE("handoff: imports count against max_num_seqs and wait for blocks in order") {
  auto o = opts(4, 8); // 8 blocks of 4: two 13-token prompts (4 blocks each) fit, a third waits
  o.max_num_seqs = 3;
  sched_driver d(o, vocab);
  std::vector<seq_id> ids;
  for (int i = 0; i < 3; ++i)
    ids.push_back(add_import(d, iota_tokens(13, 1 + 20 * i), greedy(2)));
  d.schedule();
  d.execute_and_update();
  std::vector<kv_reservation> r;
  d.sched.take_reservations(r);
  CHECK(r.size() == 2);
  CHECK(d.sched.stats().num_waiting == 1);
  REQUIRE(d.sched.cancel(ids[0]).has_value());
  REQUIRE(d.sched.release_held(ids[0]).has_value());
  d.schedule();
  d.execute_and_update();
  r.clear();
  d.sched.take_reservations(r);
  REQUIRE(r.size() == 1);
  CHECK(r[0].id == ids[2]);
}

TEST_CASE("handoff: a cancelled export reports cancelled and holds nothing") {
  sched_driver p(opts(4), vocab);
  auto pid = p.sched.add(
      {.prompt = iota_tokens(30), .handoff = kv_handoff::export_kv, .sampling = greedy(4)});
  REQUIRE(pid.has_value());
  p.req[*pid] = {.tokens = iota_tokens(30), .num_prompt = 30};
  REQUIRE(p.sched.cancel(*pid).has_value());
  p.outs.clear();
  p.sched.take_pending(p.outs);
  REQUIRE(p.outs.size() == 1);
  CHECK(p.outs[0].finish == finish_reason::cancelled);
  CHECK(p.sched.stats().num_held == 0);
  CHECK(p.sched.pool().num_free() == p.sched.pool().num_blocks());
}
