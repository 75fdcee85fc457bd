// replica_actor over worker ranks on CAF's deterministic test coordinator (no threads, no
// sleeps): the ranks are actors that hold each plan until the test answers it, computing the
// answer with the fake model (tests/unit/fake_executor.hpp), which checks the KV cache and the
// tokens fed. Covers two plans in flight at pipeline 1 (the second made ahead, continuing each
// sequence where the first ends), submit and cancel at every point of a step, refusals through
// the sink, a reply that never comes, a rank that fails or dies, and stopping the replica.
#include <doctest/doctest.h>

#include <deque>
#include <map>
#include <set>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/send.hpp>

#include "actors/messages.hpp"
#include "actors/serving/replica_actor.hpp"
#include "pipelined_executor.hpp"
#include "unit/fake_executor.hpp"

using namespace troupe;
using namespace troupe::serve;
using namespace std::chrono_literals;

namespace {

constexpr int32_t vocab = 100;
constexpr auto timeout = 1000ms;

// A request's sink: what the replica actor handed it.
struct record_sink final : request_sink {
  std::vector<engine::request_output> outs;
  std::optional<troupe::error> failed;
  void push(const engine::request_output& o) override {
    REQUIRE_FALSE(ended()); // nothing after the end
    outs.push_back(o);
  }
  void fail(const troupe::error& why) override {
    REQUIRE_FALSE(ended());
    failed = why;
  }
  bool ended() const {
    return failed || (!outs.empty() && outs.back().finish != engine::finish_reason::none);
  }
  std::vector<token_id> tokens() const {
    std::vector<token_id> t;
    for (const auto& o : outs)
      if (o.has_token)
        t.push_back(o.token);
    return t;
  }
};

// The ranks' side: plans received and not yet answered, in arrival order, and the fake model
// the answering rank computes with (its truth: every sequence's tokens so far).
struct fake_ranks {
  struct held_plan {
    int32_t rank = 0;
    uint64_t ticket = 0;
    step_plan plan;
    caf::actor replica;
  };
  std::deque<held_plan> held;
  std::map<seq_id, std::vector<token_id>> truth;
  size_t answer_rank = 0;
  test::fake_executor model{64, 4, vocab, [this](seq_id id) -> const std::vector<token_id>* {
                              auto it = truth.find(id);
                              return it == truth.end() ? nullptr : &it->second;
                            }};

  // Answers held[i] (removing it): the answering rank runs the fake model.
  void answer(size_t i, std::string error = {}) {
    auto h = std::move(held.at(i));
    held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
    msg::worker_reply r{.rank = h.rank, .ticket = h.ticket, .error = std::move(error)};
    if (r.error.empty() && static_cast<size_t>(h.rank) == answer_rank) {
      for (const auto& s : h.plan.seqs) { // prompt tokens the model sees for the first time
        auto& t = truth[s.id];
        // A choice of an n > 1 request starts past the prompt blocks it took from a sibling:
        // its history begins with what those blocks hold.
        for (int64_t q = static_cast<int64_t>(t.size()); q < s.start_pos; ++q)
          t.push_back(model.kv_slot(s.block_table[static_cast<size_t>(q / 4)], q % 4).first);
        for (size_t k = 0; k < s.tokens.size(); ++k)
          if (s.start_pos + static_cast<int64_t>(k) == static_cast<int64_t>(t.size()) &&
              s.tokens[k] != previous_sample)
            t.push_back(s.tokens[k]);
      }
      auto res = model.run(h.plan); // puts in previous_sample, as a worker rank does
      REQUIRE_MESSAGE(res.has_value(), (res ? "" : res.error().to_string()));
      for (const auto& o : res->outputs)
        truth[o.id].push_back(o.token);
      r.result = std::move(*res);
    }
    caf::anon_send(h.replica, std::move(r));
  }
  // Answers every rank's copy of the oldest plan.
  void answer_oldest() {
    REQUIRE_FALSE(held.empty());
    const uint64_t ticket = held.front().ticket;
    for (size_t i = 0; i < held.size();)
      if (held[i].ticket == ticket)
        answer(i);
      else
        ++i;
  }
  std::set<uint64_t> tickets() const {
    std::set<uint64_t> t;
    for (const auto& h : held)
      t.insert(h.ticket);
    return t;
  }
  // A sequence in two plans held together continues in the later one where the earlier ends,
  // feeding previous_sample when the earlier samples (the KV itself the fake model checks).
  size_t continued = 0;
  size_t conflicts() {
    size_t n = 0;
    for (size_t a = 0; a < held.size(); ++a)
      for (size_t b = a + 1; b < held.size(); ++b) {
        if (held[a].ticket < held[b].ticket && held[a].rank == held[b].rank)
          n += test::broken_continuations(held[a].plan, held[b].plan, continued);
      }
    return n;
  }
};

caf::behavior fake_rank(caf::event_based_actor* self, int32_t rank, fake_ranks* ranks) {
  return {[=](msg::execute_atom, uint64_t ticket, const step_plan& plan) {
    ranks->held.push_back(
        {rank, ticket, plan, caf::actor_cast<caf::actor>(self->current_sender())});
  }};
}

struct fixture {
  caf::actor_system_config cfg;
  caf::actor_system sys;
  caf::scheduler::test_coordinator& sched;
  fake_ranks ranks;
  std::vector<caf::actor> workers;
  std::shared_ptr<replica_health> health = std::make_shared<replica_health>();
  std::shared_ptr<replica_gauges> gauges = std::make_shared<replica_gauges>();
  std::vector<std::string> failures; // what on_failure was told
  caf::actor replica;
  seq_id next_id = 1;

  static caf::actor_system_config& testing(caf::actor_system_config& c) {
    c.set("scheduler.policy", caf::atom("testing"));
    c.set("logger.file-verbosity", caf::atom("quiet"));
    msg::add_message_types(c);
    return c;
  }
  explicit fixture(size_t num_ranks = 1, int32_t stages = 1, int32_t max_waiting = 64)
    : sys(testing(cfg)), sched(dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())) {
    ranks.answer_rank = num_ranks - 1;
    for (size_t r = 0; r < num_ranks; ++r)
      workers.push_back(sys.spawn(fake_rank, static_cast<int32_t>(r), &ranks));
    replica_spec spec{
        .options = {.num_blocks = 64,
                    .block_size = 4,
                    .prefix_caching = false,
                    .max_num_batched_tokens = 16,
                    .max_num_seqs = 8,
                    .max_waiting = max_waiting,
                    .max_model_len = 48,
                    .vocab_size = vocab},
        .exec = nullptr,
        .ranks = {.workers = workers,
                  .answer_rank = num_ranks - 1,
                  .timeout = timeout,
                  .stages = stages,
                  .on_failure = [this](const std::string& why) { failures.push_back(why); }},
        .health = health,
        .gauges = gauges};
    replica = spawn_replica(sys, std::move(spec));
    sched.run();
  }
  ~fixture() {
    caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
    for (auto& w : workers)
      caf::anon_send_exit(w, caf::exit_reason::user_shutdown);
    sched.run();
  }

  std::shared_ptr<record_sink> submit(std::vector<token_id> prompt, int32_t max_tokens,
                                      seq_id* id = nullptr) {
    auto sink = std::make_shared<record_sink>();
    sampling_params p;
    p.temperature = 0;
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    if (id)
      *id = next_id;
    caf::anon_send(replica, msg::submit_atom::value,
                   msg::replica_job{.id = next_id++,
                                    .request = {.prompt = std::move(prompt), .sampling = p},
                                    .sink = sink});
    return sink;
  }
  void cancel(seq_id id) { caf::anon_send(replica, msg::cancel_atom::value, id); }
  // Answers the oldest plan until nothing is held; checks every state on the way.
  void answer_all(size_t* max_in_flight = nullptr) {
    for (int i = 0; i < 1000 && !ranks.held.empty(); ++i) {
      CHECK(ranks.conflicts() == 0);
      if (max_in_flight)
        *max_in_flight = std::max(*max_in_flight, ranks.tickets().size());
      ranks.answer_oldest();
      sched.run();
    }
    REQUIRE(ranks.held.empty());
  }
  std::vector<token_id> alone(const std::vector<token_id>& prompt, int32_t max_tokens) const {
    return test::fake_alone(prompt, max_tokens, vocab, -1, 0, 48);
  }
};

} // namespace

TEST_CASE("replica actor: two plans in flight at pipeline 1, the second made ahead, every "
          "request as if alone") {
  fixture f;
  std::vector<std::pair<std::vector<token_id>, std::shared_ptr<record_sink>>> reqs;
  for (token_id t = 1; t <= 6; ++t) {
    std::vector<token_id> p(static_cast<size_t>(t + 3), t);
    reqs.emplace_back(p, f.submit(p, 7 + t));
  }
  f.sched.run();
  CHECK(f.ranks.tickets().size() == 2); // the first plan and the one made ahead went out at once
  size_t max_in_flight = 0;
  f.answer_all(&max_in_flight);
  CHECK(max_in_flight == 2);
  CHECK(f.ranks.continued > 0);
  for (size_t i = 0; i < reqs.size(); ++i) {
    CAPTURE(i);
    const auto& [prompt, sink] = reqs[i];
    REQUIRE(sink->ended());
    CHECK_FALSE(sink->failed);
    CHECK(sink->tokens() == f.alone(prompt, 7 + static_cast<int32_t>(i) + 1));
    CHECK(sink->outs.back().finish == engine::finish_reason::length);
  }
  CHECK(f.ranks.model.errors == 0);
  const auto g = f.gauges->get();
  CHECK(g.pool.num_blocks == 64);
  CHECK(g.pool.blocks_used == 0);
  CHECK(g.running == 0);
  CHECK(f.failures.empty());
  CHECK_FALSE(f.health->failed());
}

TEST_CASE("replica actor: a job's siblings (n choices) share the prompt's blocks") {
  fixture f;
  const std::vector<token_id> prompt{5, 6, 7, 8, 9, 10, 11, 12, 13, 14}; // 2 full blocks of 4
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = 6;
  p.ignore_eos = true;
  msg::replica_job job;
  std::vector<std::shared_ptr<record_sink>> sinks;
  for (int i = 0; i < 3; ++i) {
    auto& j = i == 0 ? job : job.siblings.emplace_back();
    j.id = f.next_id++;
    j.request = {.prompt = prompt, .sampling = p};
    sinks.push_back(std::make_shared<record_sink>());
    j.sink = sinks.back();
  }
  caf::anon_send(f.replica, msg::submit_atom::value, std::move(job));
  f.sched.run();
  // The first choice's prefill and, made ahead, its next decode: the others wait for its blocks.
  CHECK(f.ranks.tickets().size() == 2);
  f.answer_all();
  for (const auto& sink : sinks) {
    REQUIRE(sink->ended());
    CHECK_FALSE(sink->failed);
    CHECK(sink->tokens() == f.alone(prompt, 6));
  }
  CHECK(f.ranks.model.errors == 0);
  const auto g = f.gauges->get();
  CHECK(g.shared_prompt_tokens == 2 * 8); // the others took the first's two full blocks
  CHECK(g.pool.blocks_used == 0);
}

TEST_CASE("replica actor: submit and cancel at every point of a step") {
  // Points in the life of a step with two ranks: before the plan went out, while no rank has
  // answered, between the two ranks' answers, and after the result (before the next plan's).
  for (int point = 0; point < 4; ++point) {
    CAPTURE(point);
    fixture f(2);
    seq_id victim_id = 0;
    auto keeper = f.submit({1, 2, 3}, 12);
    auto victim = f.submit({4, 5, 6, 7}, 30, &victim_id);
    std::shared_ptr<record_sink> late;
    auto act = [&] {
      late = f.submit({9, 8, 7}, 5);
      f.cancel(victim_id);
    };
    if (point == 0)
      act(); // all in one mailbox: the replica takes them in order, before any plan goes out
    f.sched.run();
    REQUIRE_FALSE(f.ranks.held.empty());
    const uint64_t ticket = f.ranks.held.front().ticket;
    if (point == 1) {
      act();
      f.sched.run();
    }
    f.ranks.answer(0); // rank 0's answer to the oldest plan (rank 1 samples)
    f.sched.run();
    if (point == 2) {
      act();
      f.sched.run();
    }
    for (size_t i = 0; i < f.ranks.held.size(); ++i)
      if (f.ranks.held[i].ticket == ticket) {
        f.ranks.answer(i);
        break;
      }
    f.sched.run();
    if (point == 3) {
      act();
      f.sched.run();
    }
    const size_t victim_tokens = victim->tokens().size();
    CHECK(victim_tokens <= 1); // at most the step it was in
    f.answer_all();
    CHECK(victim->tokens().size() == victim_tokens); // nothing after the cancel
    REQUIRE(keeper->ended());
    CHECK(keeper->tokens() == f.alone({1, 2, 3}, 12));
    REQUIRE(late->ended());
    CHECK(late->tokens() == f.alone({9, 8, 7}, 5));
    CHECK(f.ranks.model.errors == 0);
    CHECK(f.gauges->get().pool.blocks_used == 0);
    CHECK(f.failures.empty());
  }
}

TEST_CASE("replica actor: a cancelled sequence is named finished to the ranks and never run "
          "again") {
  fixture f(1);
  seq_id id = 0;
  auto a = f.submit({1, 2, 3, 4, 5}, 40, &id);
  f.sched.run();
  REQUIRE(f.ranks.held.size() == 2); // the prefill and, made ahead, the first decode
  const seq_id engine_id = f.ranks.held.front().plan.seqs.at(0).id;
  f.cancel(id);
  f.sched.run();
  const auto sent_before = f.ranks.tickets(); // these still name it
  f.ranks.answer_oldest();
  f.sched.run();
  bool told = false, ran = false;
  for (int i = 0; i < 10 && !f.ranks.held.empty(); ++i) {
    for (const auto& h : f.ranks.held) {
      if (sent_before.count(h.ticket))
        continue;
      for (auto s : h.plan.finished)
        told = told || s == engine_id;
      for (const auto& s : h.plan.seqs)
        ran = ran || s.id == engine_id;
    }
    f.ranks.answer_oldest();
    f.sched.run();
  }
  CHECK(told);
  CHECK_FALSE(ran);
  CHECK(a->tokens().size() <= 1);
  CHECK(f.gauges->get().pool.blocks_used == 0);
  f.cancel(id); // again: a no-op
  f.cancel(999);
  f.sched.run();
  CHECK(f.ranks.held.empty());
}

TEST_CASE("replica actor: an invalid request and a full queue fail through the sink, typed") {
  fixture f(1, 1, /*max_waiting=*/1);
  auto bad = f.submit({}, 4); // empty prompt
  auto too_long = f.submit(std::vector<token_id>(60, 1), 4);
  f.sched.run();
  REQUIRE(bad->failed);
  CHECK(bad->failed->code() == errc::invalid_argument);
  REQUIRE(too_long->failed);
  CHECK(too_long->failed->code() == errc::invalid_argument);
  // One waits while a plan is in flight; the next finds the queue full.
  auto a = f.submit({1, 2}, 3);
  f.sched.run();
  auto b = f.submit({3, 4}, 3);
  auto c = f.submit({5, 6}, 3);
  f.sched.run();
  CHECK_FALSE(b->failed);
  REQUIRE(c->failed);
  CHECK(c->failed->code() == errc::resource_exhausted);
  CHECK(f.gauges->get().waiting == 1); // published without waiting for a step
  CHECK(f.gauges->get().running == 1);
  f.answer_all();
  CHECK(a->tokens() == f.alone({1, 2}, 3));
  CHECK(b->tokens() == f.alone({3, 4}, 3));
  CHECK(f.failures.empty());
}

TEST_CASE("replica actor: a reply that never comes fails the replica at the timeout, once") {
  fixture f(2);
  auto a = f.submit({1, 2, 3}, 20);
  auto b = f.submit({4, 5, 6}, 20);
  f.sched.run();
  REQUIRE(f.ranks.held.size() == 4); // the plan and the one made ahead, two ranks
  f.ranks.answer_oldest();           // the first plan completes; the next goes out
  f.sched.run();
  // Rank 1 never answers again. Before the timeout nothing happens.
  for (size_t i = 0; i < f.ranks.held.size();)
    if (f.ranks.held[i].rank == 0)
      f.ranks.answer(i);
    else
      ++i;
  f.sched.run();
  f.sched.advance_time(timeout - 1ms);
  f.sched.run();
  CHECK_FALSE(a->ended());
  CHECK(f.failures.empty());
  f.sched.advance_time(2ms);
  f.sched.run();
  REQUIRE(a->failed);
  REQUIRE(b->failed);
  CHECK(a->failed->code() == errc::unavailable);
  CHECK_MESSAGE(a->failed->message().find("1 of 2 ranks did not answer step") != std::string::npos,
                a->failed->message());
  REQUIRE(f.failures.size() == 1);
  CHECK(f.failures[0].find("deployment worker failure: ") == 0);
  CHECK(f.health->failed());
  CHECK(f.gauges->get().pool.blocks_used == 0);
  // Late answers are ignored; new requests fail at once, saying why.
  while (!f.ranks.held.empty())
    f.ranks.answer(0);
  f.sched.trigger_timeouts();
  f.sched.run();
  auto c = f.submit({7}, 2);
  f.sched.run();
  REQUIRE(c->failed);
  CHECK(c->failed->code() == errc::unavailable);
  CHECK(f.failures.size() == 1);
  CHECK(f.ranks.held.empty()); // nothing more was sent
}

TEST_CASE("replica actor: a rank that dies or reports an error fails the replica") {
  SUBCASE("dies") {
    fixture f(2);
    auto a = f.submit({1, 2, 3}, 20);
    f.sched.run();
    caf::anon_send_exit(f.workers[1], caf::exit_reason::kill);
    f.sched.run();
    REQUIRE(a->failed);
    CHECK_MESSAGE(a->failed->message().find("rank 1 is gone") != std::string::npos,
                  a->failed->message());
    REQUIRE(f.failures.size() == 1);
    CHECK(f.health->failed());
    f.ranks.answer(0); // rank 0's late answer: ignored
    f.sched.run();
    CHECK(f.failures.size() == 1);
  }
  SUBCASE("reports an error") {
    fixture f(2);
    auto a = f.submit({1, 2, 3}, 20);
    f.sched.run();
    REQUIRE(f.ranks.held.size() == 4); // the plan and the one made ahead, two ranks
    f.ranks.answer(0, "CUDA error: an illegal memory access");
    f.sched.run();
    REQUIRE(a->failed);
    CHECK_MESSAGE(a->failed->message().find("rank 0 failed step") != std::string::npos,
                  a->failed->message());
    CHECK(a->failed->message().find("illegal memory access") != std::string::npos);
    REQUIRE(f.failures.size() == 1);
  }
}

TEST_CASE("replica actor: stopping it ends its live requests as cancelled") {
  fixture f(1);
  auto a = f.submit({1, 2, 3}, 20);
  f.sched.run();
  caf::anon_send_exit(f.replica, caf::exit_reason::user_shutdown);
  f.sched.run();
  REQUIRE(a->failed);
  CHECK(a->failed->code() == errc::cancelled);
}
