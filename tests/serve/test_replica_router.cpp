// replica_router over fake executors (no model): least-loaded routing with ties in turn, a
// failed replica skipped, 503-style errors naming why when none serves, take_down / install
// (a restarted replica serves again), cancel reaching the replica that took the request, submit
// and cancel never waiting for a replica inside a step, /metrics summed over replicas, and
// prefix-cache affinity (prefix_affinity alone, and requests sharing a prefix going together).
#include <doctest/doctest.h>

#include <condition_variable>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/serving/replica_router.hpp"
#include "serve/request_channel.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

// Answers token `token` for every sequence that wants logits; waits while its gate is shut;
// fails every step once `fail` is set (as a replica's ranks do after a worker is lost).
class fake_replica final : public engine::executor {
 public:
  explicit fake_replica(token_id token) : token_(token) {}
  expected<step_result> execute(const step_plan& plan) override {
    std::unique_lock lk(mu_);
    ++entered_;
    cv_.notify_all();
    cv_.wait(lk, [&] { return open_; });
    ++steps_;
    if (fail_)
      return make_error(errc::unavailable, "deployment worker failure: rank 0 is gone");
    step_result r{.step = plan.step, .outputs = {}};
    for (const auto& s : plan.seqs)
      if (s.logits != logits_mode::none)
        r.outputs.push_back({.id = s.id, .token = token_});
    return r;
  }
  void gate(bool open) {
    {
      std::lock_guard lk(mu_);
      open_ = open;
    }
    cv_.notify_all();
  }
  void fail() {
    std::lock_guard lk(mu_);
    fail_ = true;
  }
  int steps() {
    std::lock_guard lk(mu_);
    return steps_;
  }
  // Waits (up to 10 s) until `n` steps have begun.
  bool entered(int n) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(10), [&] { return entered_ >= n; });
  }

 private:
  token_id token_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true, fail_ = false;
  int steps_ = 0, entered_ = 0;
};

// The replica actors' system: detached actors (in-process executors), joined at the end.
struct actor_system_fixture {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
};

engine::scheduler_options options() {
  return {.num_blocks = 32,
          .block_size = 4,
          .max_num_batched_tokens = 64,
          .max_num_seqs = 8,
          .max_model_len = 64,
          .vocab_size = 100};
}

engine::request req(int32_t max_tokens) {
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = max_tokens;
  return {.prompt = {1, 2, 3}, .sampling = p, .stop_token_ids = {}};
}

// Installs a fake replica; returns it (owned by the router) and its health.
std::pair<fake_replica*, std::shared_ptr<replica_health>>
install(replica_router& r, size_t i, token_id token, int32_t blocks = 32) {
  auto exec = std::make_unique<fake_replica>(token);
  auto* raw = exec.get();
  auto health = std::make_shared<replica_health>();
  auto ok = r.install(i, {std::move(exec), blocks, health});
  REQUIRE_MESSAGE(ok.has_value(), (ok ? "" : ok.error().message()));
  return {raw, health};
}

// Submits with a channel as the sink; returns the id and the channel.
expected<std::pair<seq_id, std::shared_ptr<request_channel>>> submit(replica_router& r,
                                                                     engine::request q) {
  auto ch = std::make_shared<request_channel>();
  auto id = r.submit(std::move(q), ch);
  if (!id)
    return std::move(id).error();
  return std::make_pair(*id, ch);
}

// Drains a request's channel to its end; returns the tokens (and whether it failed).
std::vector<token_id> drain(request_channel& ch, bool* failed = nullptr) {
  std::vector<token_id> tokens;
  for (int i = 0; i < 400; ++i) {
    std::vector<engine::request_output> outs;
    ch.wait(outs, 10);
    for (const auto& o : outs) {
      if (o.has_token)
        tokens.push_back(o.token);
      if (o.finish != engine::finish_reason::none) {
        if (failed)
          *failed = ch.failed();
        return tokens;
      }
    }
  }
  FAIL("the request did not finish");
  return tokens;
}

// The engines publish their gauges after each step, a moment after the outputs go out.
bool blocks_freed(const replica_router& r) {
  for (int i = 0; i < 200 && r.kv_blocks_in_use() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return r.kv_blocks_in_use() == 0;
}

double metric(const replica_router& r, const std::string& line_prefix) {
  serve_metrics m;
  const auto text = r.metrics_text(m, "m");
  const auto at = text.find("\n" + line_prefix);
  REQUIRE_MESSAGE(at != std::string::npos, line_prefix);
  const auto end = text.find('\n', at + 1);
  const auto line = text.substr(at + 1, end - at - 1);
  return std::stod(line.substr(line.rfind(' ') + 1));
}

} // namespace

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: least unfinished requests first, ties in turn, both replicas answer") {
  replica_router router(sys, "m", 2, options());
  auto [r0, h0] = install(router, 0, 10);
  auto [r1, h1] = install(router, 1, 11);
  r0->gate(false);
  r1->gate(false);
  auto a = submit(router, req(4)); // replica 0 (first turn); its engine now waits in a step
  REQUIRE(a.has_value());
  auto b = submit(router, req(4)); // replica 1: one unfinished request on replica 0
  REQUIRE(b.has_value());
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"0\"}") == 1);
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"1\"}") == 1);
  r0->gate(true);
  r1->gate(true);
  CHECK(drain(*a->second) == std::vector<token_id>(4, 10));
  CHECK(drain(*b->second) == std::vector<token_id>(4, 11));
  // Idle replicas tie: requests alternate (each replica idle again before the next).
  for (int i = 0; i < 4; ++i) {
    auto c = submit(router, req(2));
    REQUIRE(c.has_value());
    drain(*c->second);
    CHECK(blocks_freed(router));
  }
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"0\"}") == 3);
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"1\"}") == 3);
  CHECK(r0->steps() > 0);
  CHECK(r1->steps() > 0);
  CHECK(metric(router, "troupe_kv_blocks_total{") == 64); // summed over replicas
  CHECK(blocks_freed(router));
}

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: a failed replica gets no requests, with none serving submit says why") {
  replica_router router(sys, "m", 2, options());
  auto [r0, h0] = install(router, 0, 10);
  auto [r1, h1] = install(router, 1, 11);
  // Replica 1's executor fails mid-request: that request fails, the others go to replica 0.
  r1->gate(false);
  auto a = submit(router, req(50)); // replica 0
  auto b = submit(router, req(50)); // replica 1, stuck in its first step
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  r1->fail();
  h1->fail("deployment worker failure: rank 0 is gone");
  r1->gate(true);
  bool failed = false;
  drain(*b->second, &failed);
  CHECK(failed);
  CHECK(b->second->failure().find("rank 0 is gone") != std::string::npos);
  CHECK(metric(router, "troupe_replica_up{model_name=\"m\",replica=\"1\"}") == 0);
  for (int i = 0; i < 3; ++i) {
    auto c = submit(router, req(2));
    REQUIRE(c.has_value());
    CHECK(drain(*c->second) == std::vector<token_id>{10, 10});
  }
  CHECK(drain(*a->second).size() == 50);

  // The head drops replica 1 and replica 0 fails too: nothing serves, submit says why.
  router.take_down(1, "replica 1 failed: node w2 holding a rank died: connection lost");
  h0->fail("deployment worker failure: rank 0 is gone (timeout)");
  auto none = submit(router, req(2));
  REQUIRE_FALSE(none.has_value());
  CHECK(none.error().code() == errc::unavailable);
  const auto msg = none.error().message();
  CHECK_MESSAGE(msg.find("deployment 'm' is restarting") != std::string::npos, msg);
  CHECK_MESSAGE(msg.find("replica 0 failed: deployment worker failure: rank 0 is gone (timeout)") !=
                    std::string::npos,
                msg);
  CHECK_MESSAGE(msg.find("node w2 holding a rank died") != std::string::npos, msg);

  // A restarted replica 1 serves again.
  install(router, 1, 12);
  auto d = submit(router, req(3));
  REQUIRE(d.has_value());
  CHECK(drain(*d->second) == std::vector<token_id>{12, 12, 12});
  CHECK(metric(router, "troupe_replica_up{model_name=\"m\",replica=\"1\"}") == 1);
}

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: a replica taken down ends its streams with the head's reason") {
  replica_router router(sys, "m", 1, options());
  auto [r0, h0] = install(router, 0, 10);
  r0->gate(false);
  auto a = submit(router, req(50)); // held in its first step
  REQUIRE(a.has_value());
  router.take_down(0, "replica 0 failed: node w1 holding a rank died: connection lost");
  r0->gate(true);
  bool failed = false;
  drain(*a->second, &failed);
  CHECK(failed);
  CHECK_MESSAGE(a->second->failure().find("node w1 holding a rank died") != std::string::npos,
                a->second->failure());
}

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: cancel reaches the replica that took the request") {
  // Both engines number their first request 1: a cancel sent to the wrong replica would end
  // the other request.
  replica_router router(sys, "m", 2, options());
  auto [r0, h0] = install(router, 0, 10);
  auto [r1, h1] = install(router, 1, 11);
  r0->gate(false);
  r1->gate(false);
  auto a = submit(router, req(5));  // replica 0, held in its first step
  auto b = submit(router, req(60)); // replica 1, held in its first step
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  router.cancel(b->first);
  r0->gate(true);
  r1->gate(true);
  CHECK(drain(*a->second) == std::vector<token_id>(5, 10));
  size_t b_tokens = 0;
  for (int i = 0; i < 10; ++i) {
    std::vector<engine::request_output> outs;
    b->second->wait(outs, 10);
    for (const auto& o : outs)
      b_tokens += o.has_token;
  }
  CHECK(b_tokens <= 1); // the step it was held in, then nothing
  CHECK(r1->steps() <= 2);
  CHECK(blocks_freed(router));
  router.cancel(b->first); // again: a no-op
  router.cancel(12345);    // unknown: a no-op
}

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: submit and cancel return at once while the replica is inside a step, "
                  "and the replica takes them before its next step") {
  replica_router router(sys, "m", 1, options());
  auto [r0, h0] = install(router, 0, 10);
  r0->gate(false);
  auto a = submit(router, req(3));
  REQUIRE(a.has_value());
  REQUIRE(r0->entered(1)); // the replica's thread now waits inside its first step
  auto b = submit(router, req(3));
  auto c = submit(router, req(40));
  REQUIRE(b.has_value());
  REQUIRE(c.has_value());
  router.cancel(c->first);
  CHECK(r0->steps() == 0); // all of the above while the step was still held
  r0->gate(true);
  CHECK(drain(*a->second) == std::vector<token_id>(3, 10));
  CHECK(drain(*b->second) == std::vector<token_id>(3, 10));
  std::vector<engine::request_output> outs;
  c->second->wait(outs, 50);
  CHECK(outs.empty()); // cancelled before any step ran it
  CHECK(blocks_freed(router));
}

TEST_CASE_FIXTURE(actor_system_fixture, "router: a replica that never loaded says so") {
  replica_router router(sys, "m", 1, options());
  auto r = submit(router, req(1));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message().find("replica 0 is loading") != std::string::npos);
  auto bad = router.install(3, {});
  CHECK_FALSE(bad.has_value());
}

TEST_CASE("prefix_affinity: the longest block-aligned prefix names its replica, bounded") {
  prefix_affinity a(4, 8);
  const std::vector<token_id> p1{1, 2, 3, 4, 5, 6, 7, 8, 9}, p2{1, 2, 3, 4, 9, 9, 9, 9};
  CHECK_FALSE(a.lookup(p1).has_value());
  a.record(0, p1); // prefixes of 4 and 8 tokens
  auto m = a.lookup(p1);
  REQUIRE(m.has_value());
  CHECK(m->replica == 0);
  CHECK(m->tokens == 8);
  a.record(1, p2); // shares the first block with p1: now replica 1's; p1's second stays 0's
  CHECK(a.lookup(p2)->replica == 1);
  CHECK(a.lookup(p2)->tokens == 8);
  CHECK(a.lookup(p1)->replica == 0);
  CHECK_FALSE(a.lookup(std::vector<token_id>{1, 2, 3}).has_value());    // no whole block
  CHECK_FALSE(a.lookup(std::vector<token_id>{5, 6, 7, 8}).has_value()); // not a prefix
  a.forget(1);
  CHECK_FALSE(a.lookup(p2).has_value()); // its first block was replica 1's
  for (token_id t = 0; t < 20; ++t)
    a.record(2, std::vector<token_id>{t, t, t, t});
  CHECK(a.size() <= 8); // the oldest are forgotten
  CHECK(a.lookup(std::vector<token_id>{19, 19, 19, 19})->replica == 2);
  CHECK_FALSE(a.lookup(std::vector<token_id>{0, 0, 0, 0}).has_value());
}

TEST_CASE_FIXTURE(actor_system_fixture,
                  "router: requests sharing a prefix go to the replica that took it") {
  replica_router router(sys, "m", 2, options());
  install(router, 0, 10);
  install(router, 1, 11);
  auto with_prompt = [](std::vector<token_id> prompt) {
    auto q = req(2);
    q.prompt = std::move(prompt);
    return q;
  };
  // Two conversations of two blocks each, alternating: without affinity they would alternate
  // replicas; with it each stays where its prefix went.
  std::vector<token_id> sys_a{5, 5, 5, 5, 6, 6, 6, 6}, sys_b{7, 7, 7, 7, 8, 8, 8, 8};
  for (int i = 0; i < 3; ++i)
    for (auto* base : {&sys_a, &sys_b}) {
      auto p = *base;
      p.push_back(static_cast<token_id>(20 + i));
      auto c = submit(router, with_prompt(p));
      REQUIRE(c.has_value());
      const auto tokens = drain(*c->second);
      CHECK(tokens == std::vector<token_id>(2, base == &sys_a ? 10 : 11));
    }
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"0\"}") == 3);
  CHECK(metric(router, "troupe_replica_requests_total{model_name=\"m\",replica=\"1\"}") == 3);
  CHECK(blocks_freed(router));
}
