// Planning ahead (pipeline 1): the scheduler makes step n+1 while step n is outstanding, feeding
// previous_sample for what step n samples; executor::run puts the token in. Covered here: the
// rules of can_plan_ahead() and which sequences a plan made ahead carries, a stop sampled in step
// n (step n+1's token dropped), no preemption ahead, the executor's side, threaded_executor under
// an engine loop (a plan nothing is planned ahead of runs on the caller's thread), and a failure
// with two plans in flight. The randomised simulation (test_scheduler_sim.cpp) and the golden
// models (engine_loop_tests) run planned ahead too.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "engine/exec/threaded_executor.hpp"
#include "engine/scheduler/engine_loop.hpp"
#include "pipelined_executor.hpp"
#include "sched_driver.hpp"

using namespace troupe;
using namespace troupe::engine;
using troupe::test::greedy;
using troupe::test::sched_driver;

namespace {

constexpr int32_t vocab = 100;
// Prompts in chunks of up to 16 tokens, contexts of up to 48.
const scheduler_options chunked{.num_blocks = 64,
                                .block_size = 4,
                                .max_num_batched_tokens = 16,
                                .max_model_len = 48,
                                .vocab_size = vocab};

// Allows every token and never ends.
struct any_token final : token_constraint {
  void fill_mask(std::vector<uint32_t>& mask) override { mask.assign((vocab + 31) / 32, ~0u); }
  bool accept(token_id) override { return true; }
  bool terminated() const override { return false; }
  std::unique_ptr<token_constraint> fork() const override { return std::make_unique<any_token>(); }
};

} // namespace

TEST_CASE("scheduler, planned ahead: a decode feeds previous_sample, and a stop sampled in step n "
          "drops step n+1's token") {
  const std::vector<token_id> prompt{5, 6, 7};
  const auto chain = test::fake_alone(prompt, 10, vocab, -1, 0, 64);
  const token_id eos = chain[2]; // the third token ends it
  REQUIRE((chain[0] != eos && chain[1] != eos));
  sched_driver d({.num_blocks = 32,
                  .block_size = 4,
                  .max_model_len = 64,
                  .vocab_size = vocab,
                  .eos_token_ids = {eos}},
                 vocab, true);
  sampling_params sp = greedy(10);
  sp.ignore_eos = false;
  const seq_id id = d.add(prompt, sp);

  step_plan p1, p2;
  d.schedule_into(p1);
  REQUIRE(p1.seqs.size() == 1);
  CHECK(p1.seqs[0].tokens == prompt);
  CHECK(d.sched.can_plan_ahead());
  d.schedule_into(p2);
  REQUIRE(p2.seqs.size() == 1);
  CHECK(p2.seqs[0].start_pos == 3);
  CHECK(p2.seqs[0].tokens == std::vector<token_id>{previous_sample});
  CHECK(p2.seqs[0].logits == logits_mode::last);
  CHECK(d.sched.outstanding() == 2);
  CHECK_FALSE(d.sched.can_plan_ahead()); // two already
  d.queued = {p1, p2};
  while (d.step_ahead())
    ;
  const auto& rec = d.req.at(id);
  CHECK(rec.output == std::vector<token_id>(chain.begin(), chain.begin() + 3));
  CHECK(rec.finish == finish_reason::stop);
  CHECK(rec.stop_token == eos);
  CHECK(d.continued > 0);
  CHECK(d.exec.errors == 0);
  CHECK(d.sched.outstanding() == 0);
  CHECK(d.sched.pool().num_free() == 32);
  CHECK(d.sched.check().has_value());
}

TEST_CASE("scheduler, planned ahead: what ends for certain is left out, grammar rows and prompt "
          "logprobs plan one step at a time") {
  sched_driver d({.num_blocks = 32, .block_size = 4, .max_model_len = 64, .vocab_size = vocab},
                 vocab, true);
  step_plan p1, p2;
  SUBCASE("max_tokens reached in step n") {
    d.add({1, 2, 3}, greedy(1));
    d.schedule_into(p1);
    REQUIRE(d.sched.can_plan_ahead());
    d.schedule_into(p2);
    CHECK(p2.seqs.empty()); // nothing else to run: not outstanding
    CHECK(d.sched.outstanding() == 1);
  }
  SUBCASE("the context limit reached in step n") {
    sched_driver e({.num_blocks = 32, .block_size = 4, .max_model_len = 4, .vocab_size = vocab},
                   vocab, true);
    e.add({1, 2, 3}, greedy(10));
    e.schedule_into(p1);
    e.schedule_into(p2);
    CHECK(p2.seqs.empty());
  }
  SUBCASE("a grammar row") {
    auto id = d.sched.add(
        {.prompt = {1, 2, 3}, .sampling = greedy(5), .constraint = std::make_shared<any_token>()});
    REQUIRE(id.has_value());
    d.req[*id] = {.tokens = {1, 2, 3}, .num_prompt = 3};
    d.fed[*id] = {1, 2, 3};
    d.schedule_into(p1);
    CHECK_FALSE(d.sched.can_plan_ahead());
    CHECK(d.sched.can_plan_ahead(true)); // its masks filled once step n is updated
    CHECK(d.sched.constrained(p1));
    d.sched.fill_masks(p1);
    CHECK_FALSE(p1.seqs[0].allowed_tokens.empty());
  }
  SUBCASE("prompt logprobs") {
    sampling_params sp = greedy(3);
    sp.prompt_logprobs = 0;
    d.add({1, 2, 3, 4, 5}, sp);
    d.schedule_into(p1);
    CHECK(p1.seqs[0].logits == logits_mode::all);
    CHECK_FALSE(d.sched.can_plan_ahead());
  }
  SUBCASE("a new request joins the plan made ahead, beside the continued decode") {
    d.add({1, 2, 3}, greedy(4));
    d.schedule_into(p1);
    d.add({9, 8}, greedy(4));
    d.schedule_into(p2);
    REQUIRE(p2.seqs.size() == 2);
    CHECK(p2.seqs[0].tokens == std::vector<token_id>{previous_sample});
    CHECK(p2.seqs[1].tokens == std::vector<token_id>{9, 8});
  }
}

TEST_CASE("scheduler, planned ahead: short of blocks, a plan made ahead never preempts, the next "
          "one made alone does") {
  sched_driver d({.num_blocks = 4, .block_size = 2, .max_model_len = 64, .vocab_size = vocab},
                 vocab, true);
  const std::vector<token_id> a{1, 2}, b{3, 4};
  const seq_id ia = d.add(a, greedy(6)), ib = d.add(b, greedy(6));
  size_t most = 0;
  for (int i = 0; i < 100 && d.step_ahead(); ++i)
    most = std::max(most, d.sched.outstanding() + 1);
  CHECK(most == 2);
  CHECK(d.sched.stats().preemptions > 0);
  CHECK(d.req.at(ia).output == test::fake_alone(a, 6, vocab, -1, 0, 64));
  CHECK(d.req.at(ib).output == test::fake_alone(b, 6, vocab, -1, 0, 64));
  CHECK(d.exec.errors == 0);
  CHECK(d.sched.pool().num_free() == 4);
}

TEST_CASE("executor::run puts in previous_sample from what it sampled, and refuses one it "
          "cannot") {
  test::fake_executor exec(16, 4, vocab, nullptr);
  auto decode = [](seq_id id, int32_t pos) {
    step_plan p;
    p.seqs.push_back(
        {.id = id, .start_pos = pos, .tokens = {previous_sample}, .block_table = {0, 1}});
    return p;
  };
  step_plan p1;
  p1.step = 1;
  p1.seqs.push_back({.id = 1, .start_pos = 0, .tokens = {4, 5, 6}, .block_table = {0, 1}});
  auto r1 = exec.run(p1);
  REQUIRE(r1.has_value());
  REQUIRE(r1->outputs.size() == 1);
  auto p2 = decode(1, 3);
  p2.step = 2;
  auto r2 = exec.run(p2);
  REQUIRE(r2.has_value());
  CHECK(p2.seqs[0].tokens[0] == r1->outputs[0].token);
  CHECK(exec.errors == 0);

  auto p3 = decode(2, 0); // never sampled
  auto r3 = exec.run(p3);
  REQUIRE_FALSE(r3.has_value());
  CHECK(r3.error().code() == errc::internal);
  CHECK(r3.error().message().find("sampled none") != std::string::npos);
  auto p4 = decode(1, 4);
  p4.finished = {1}; // dropped since
  CHECK_FALSE(exec.run(p4).has_value());
}

TEST_CASE("threaded_executor: an engine loop plans ahead over it, every request as if alone") {
  auto owned = std::make_unique<test::fake_executor>(64, 4, vocab, nullptr);
  auto* fake = owned.get();
  threaded_executor exec(std::move(owned));
  CHECK(exec.overlaps());
  engine_loop loop(chunked, exec);
  std::map<seq_id, std::vector<token_id>> prompts, got;
  for (token_id t = 1; t <= 6; ++t) {
    std::vector<token_id> p(static_cast<size_t>(t + 2), t);
    auto id = loop.add_request({.prompt = p, .sampling = greedy(5 + t)});
    REQUIRE(id.has_value());
    prompts[*id] = p;
  }
  bool two_in_flight = false;
  for (int i = 0; i < 500 && loop.has_work(); ++i) {
    auto out = loop.step();
    REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
    two_in_flight |= loop.in_flight() == 1; // the plan made ahead runs on while this returns
    if (loop.in_flight())                   // nothing may run beside it on the caller's thread
      CHECK_FALSE(exec.execute(step_plan{}).has_value());
    for (const auto& o : *out)
      if (o.has_token)
        got[o.id].push_back(o.token);
  }
  CHECK_FALSE(loop.has_unfinished());
  CHECK(loop.in_flight() == 0);
  CHECK(two_in_flight);
  for (const auto& [id, p] : prompts) {
    CAPTURE(id);
    CHECK(got[id] == test::fake_alone(p, 5 + static_cast<int32_t>(p[0]), vocab, -1, 0, 48));
  }
  CHECK(fake->errors == 0);
  CHECK(loop.usage().blocks_used == 0);
}

namespace {
// Idle work in pieces of ~1 ms (as a CUDA warm-up step would be), noting any overlap with a plan.
struct idle_recorder final : executor {
  explicit idle_recorder(std::unique_ptr<executor> inner) : inner_(std::move(inner)) {}
  std::atomic<int> pieces{0}, overlaps{0};
  std::atomic<bool> in_piece{false};
  int limit = 50;
  expected<step_result> execute(const step_plan& plan) override {
    overlaps += in_piece.load();
    return inner_->execute(plan);
  }
  bool idle_work() override {
    in_piece = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    in_piece = false;
    return ++pieces < limit;
  }
  std::unique_ptr<executor> inner_;
};
} // namespace

TEST_CASE("threaded_executor: idle work runs while no plan waits, never beside a plan, and stops "
          "when done") {
  auto owned =
      std::make_unique<idle_recorder>(std::make_unique<test::fake_executor>(64, 4, vocab, nullptr));
  auto* rec = owned.get();
  threaded_executor exec(std::move(owned));
  for (int i = 0; i < 200 && rec->pieces == 0; ++i) // it starts on its own
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(rec->pieces > 0);
  engine_loop loop(chunked, exec);
  std::vector<token_id> prompt(5, 3);
  auto id = loop.add_request({.prompt = prompt, .sampling = greedy(7)});
  REQUIRE(id.has_value());
  std::vector<token_id> got;
  for (int i = 0; i < 500 && loop.has_work(); ++i) {
    auto out = loop.step();
    REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
    for (const auto& o : *out)
      if (o.has_token)
        got.push_back(o.token);
    // On this thread, between steps: waits for a piece running, none starts meanwhile.
    if (!loop.in_flight())
      CHECK(exec.execute(step_plan{}).has_value());
  }
  CHECK(got == test::fake_alone(prompt, 7, vocab, -1, 0, 48));
  for (int i = 0; i < 2000 && rec->pieces < rec->limit; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(rec->pieces == rec->limit);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(rec->pieces == rec->limit); // no more once it said none is left
  CHECK(rec->overlaps == 0);
}

namespace {
// Notes the thread each plan ran on.
struct thread_recorder final : executor {
  explicit thread_recorder(std::unique_ptr<executor> inner) : inner_(std::move(inner)) {}
  std::vector<std::thread::id> ran_on;
  expected<step_result> execute(const step_plan& plan) override {
    ran_on.push_back(std::this_thread::get_id());
    return inner_->execute(plan);
  }
  std::unique_ptr<executor> inner_;
};
} // namespace

TEST_CASE("threaded_executor: a plan nothing is planned ahead of (prompt logprobs) runs on the "
          "caller's thread") {
  auto owned = std::make_unique<thread_recorder>(
      std::make_unique<test::fake_executor>(64, 4, vocab, nullptr));
  auto* rec = owned.get();
  threaded_executor exec(std::move(owned));
  engine_loop loop({.num_blocks = 64, .block_size = 4, .max_model_len = 48, .vocab_size = vocab},
                   exec);
  auto run = [&](request r) {
    REQUIRE(loop.add_request(std::move(r)).has_value());
    for (int i = 0; i < 100 && loop.has_work(); ++i)
      REQUIRE(loop.step().has_value());
    CHECK_FALSE(loop.has_unfinished());
  };
  sampling_params scored = greedy(4);
  scored.prompt_logprobs = 0;
  run({.prompt = {1, 2, 3}, .sampling = scored});
  REQUIRE(rec->ran_on.size() == 4);
  // It scores the prompt (the fake model reports no prompt logprobs, so every step does).
  for (auto id : rec->ran_on)
    CHECK(id == std::this_thread::get_id());
  rec->ran_on.clear();
  run({.prompt = {1, 2, 3}, .sampling = greedy(4)});
  CHECK(std::count(rec->ran_on.begin(), rec->ran_on.end(), std::this_thread::get_id()) == 0);
}

namespace {
// Tokens alternate even, odd, even, ...: each mask depends on every token accepted before.
struct parity final : token_constraint {
  int accepted = 0;
  void fill_mask(std::vector<uint32_t>& mask) override {
    mask.assign((vocab + 31) / 32, 0u);
    for (token_id t = accepted % 2; t < vocab; t += 2)
      mask[static_cast<size_t>(t) / 32] |= 1u << (static_cast<uint32_t>(t) % 32);
  }
  bool accept(token_id t) override {
    if (t % 2 != accepted % 2)
      return false;
    ++accepted;
    return true;
  }
  bool terminated() const override { return false; }
  std::unique_ptr<token_constraint> fork() const override {
    return std::make_unique<parity>(*this);
  }
};
} // namespace

TEST_CASE("threaded_executor: grammar rows are planned ahead, their masks filled once the step "
          "before is updated") {
  auto owned = std::make_unique<test::fake_executor>(64, 4, vocab, nullptr);
  threaded_executor exec(std::move(owned));
  engine_loop loop({.num_blocks = 64, .block_size = 4, .max_model_len = 48, .vocab_size = vocab},
                   exec);
  std::map<seq_id, std::vector<token_id>> got;
  for (token_id t = 1; t <= 3; ++t) {
    auto id = loop.add_request(
        {.prompt = {t, t, t}, .sampling = greedy(12), .constraint = std::make_shared<parity>()});
    REQUIRE(id.has_value());
    got[*id];
  }
  bool two_in_flight = false;
  for (int i = 0; i < 100 && loop.has_work(); ++i) {
    auto out = loop.step();
    REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
    two_in_flight |= loop.in_flight() == 1;
    for (const auto& o : *out)
      if (o.has_token)
        got[o.id].push_back(o.token);
  }
  CHECK_FALSE(loop.has_unfinished());
  CHECK(two_in_flight);
  CHECK(loop.stats().constraint_violations == 0);
  for (const auto& [id, toks] : got) {
    CAPTURE(id);
    REQUIRE(toks.size() == 12);
    for (size_t k = 0; k < toks.size(); ++k)
      CHECK(toks[k] % 2 == static_cast<token_id>(k % 2));
  }
}

TEST_CASE("engine_loop, planned ahead: a failure with two plans in flight ends every request") {
  std::map<seq_id, std::vector<token_id>> hist;
  test::fake_executor fake(32, 4, vocab, nullptr);
  test::pipelined_executor exec(fake, 1, true);
  engine_loop loop({.num_blocks = 32,
                    .block_size = 4,
                    .max_num_batched_tokens = 16,
                    .max_model_len = 32,
                    .vocab_size = vocab},
                   exec);
  REQUIRE(loop.add_request({.prompt = {1, 2, 3}, .sampling = greedy(20)}).has_value());
  REQUIRE(loop.add_request({.prompt = {4, 5}, .sampling = greedy(20)}).has_value());
  REQUIRE(loop.step().has_value()); // two submitted, the first collected
  CHECK(loop.in_flight() == 1);
  fake.fail_next = true;
  auto r = loop.step();
  REQUIRE_FALSE(r.has_value());
  auto ended = loop.fail_all();
  CHECK(ended.size() == 2);
  CHECK(loop.in_flight() == 0);
  CHECK_FALSE(loop.has_unfinished());
  CHECK(loop.usage().blocks_used == 0);
  CHECK(loop.sched().outstanding() == 0);
  REQUIRE(loop.add_request({.prompt = {7, 8}, .sampling = greedy(2)}).has_value()); // usable
  for (int i = 0; i < 10 && loop.has_work(); ++i)
    REQUIRE(loop.step().has_value());
  CHECK_FALSE(loop.has_unfinished());
  CHECK(exec.conflicts == 0);
}

namespace {
// Notes when it is destroyed, into a log shared with the executor that runs on it.
struct logged_backend final : backend {
  explicit logged_backend(std::vector<std::string>& log) : log_(log) {}
  ~logged_backend() override { log_.push_back("backend"); }
  const model_config& config() const override { return config_; }
  kv_cache_options kv_options() const override { return {}; }
  kv_layout kv_memory() const override { return {}; }
  expected<void> forward(const step_plan&, forward_output&) override { return {}; }
  std::vector<std::string>& log_;
  model_config config_;
};
struct logged_executor final : executor {
  logged_executor(std::vector<std::string>& log, std::unique_ptr<executor> inner)
    : log_(log), inner_(std::move(inner)) {}
  ~logged_executor() override { log_.push_back("executor"); }
  expected<step_result> execute(const step_plan& plan) override { return inner_->execute(plan); }
  bool idle_work() override {
    ++idle;
    return false;
  }
  std::vector<std::string>& log_;
  std::unique_ptr<executor> inner_;
  std::atomic<int> idle{0};
};
} // namespace

TEST_CASE("threaded_executor: the backend it owns outlives the executor that runs on it, whose "
          "idle work it does") {
  std::vector<std::string> log;
  {
    auto inner = std::make_unique<logged_executor>(
        log, std::make_unique<test::fake_executor>(64, 4, vocab, nullptr));
    auto* rec = inner.get();
    threaded_executor exec(std::move(inner), std::make_unique<logged_backend>(log));
    for (int i = 0; i < 200 && rec->idle == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    CHECK(rec->idle == 1); // asked once; it had none, so never again
    CHECK(exec.execute(step_plan{}).has_value());
    CHECK(log.empty());
  }
  CHECK(log == std::vector<std::string>{"executor", "backend"});
}
