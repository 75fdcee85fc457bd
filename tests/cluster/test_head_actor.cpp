// head_actor and node_actor in one process (a real CAF actor system, no network): the KV store's
// set/get/wait, token checks on every client message, join, refusal, and failure detection.
#include <doctest/doctest.h>

#include <future>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/head_actor.hpp"
#include "actors/messages.hpp"
#include "actors/node_actor.hpp"

using namespace troupe;
using namespace std::chrono_literals;

namespace {

struct fixture {
  actors::system_config cfg;
  caf::actor_system sys;
  caf::actor head;
  fixture() : sys((msg::add_message_types(cfg), cfg)) {
    head = sys.spawn(actors::head_actor, actors::head_config{.token = "tok",
                                                             .version = "1.0",
                                                             .membership = {.dead_after = 600ms},
                                                             .heartbeat = 100ms,
                                                             .tick = 20ms});
  }
  ~fixture() {
    caf::scoped_actor self{sys};
    self->send_exit(head, caf::exit_reason::user_shutdown);
  }

  template <class T, class... Ts>
  expected<T> ask(Ts&&... xs) {
    caf::scoped_actor self{sys};
    expected<T> out = make_error(errc::internal, "no reply");
    self->request(head, 5s, std::forward<Ts>(xs)...)
        .receive([&](T& v) { out = std::move(v); },
                 [&](caf::error& e) { out = actors::from_caf(e, &sys); });
    return out;
  }

  // An exit message from this process (head and node actors drop anonymous ones: they could
  // come from anywhere).
  void exit(const caf::actor& a, caf::exit_reason reason) {
    caf::scoped_actor self{sys};
    self->send_exit(a, reason);
  }

  msg::cluster_view view() {
    auto v = ask<msg::cluster_view>(msg::status_atom::value, std::string("tok"));
    REQUIRE(v);
    return *v;
  }

  actors::node_config node(const std::string& id, const std::string& token) {
    actors::node_config nc{.local_head = head, .token = token, .version = "1.0"};
    nc.info.node_id = id;
    nc.info.address = "127.0.0.1";
    return nc;
  }
};

template <class F>
bool eventually(F f, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (f())
      return true;
    std::this_thread::sleep_for(10ms);
  }
  return f();
}

} // namespace

TEST_CASE("head_actor: kv set, get and wait, namespaced") {
  fixture fx;
  using str = std::string;
  CHECK(fx.ask<bool>(msg::kv_set_atom::value, str("tok"), str("dep"), str("k"), str("v1")));
  auto got = fx.ask<str>(msg::kv_get_atom::value, str("tok"), str("dep"), str("k"));
  REQUIRE(got);
  CHECK(*got == "v1");
  auto missing = fx.ask<str>(msg::kv_get_atom::value, str("tok"), str("other"), str("k"));
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == errc::not_found);

  // A waiter blocked on a key is answered by a later set from someone else.
  auto waiter = std::async(std::launch::async, [&] {
    return fx.ask<str>(msg::kv_wait_atom::value, str("tok"), str("dep"), str("late"),
                       int64_t{3000});
  });
  std::this_thread::sleep_for(100ms);
  CHECK(fx.ask<bool>(msg::kv_set_atom::value, str("tok"), str("dep"), str("late"), str("id42")));
  auto woke = waiter.get();
  REQUIRE(woke);
  CHECK(*woke == "id42");

  auto t0 = std::chrono::steady_clock::now();
  auto timed_out =
      fx.ask<str>(msg::kv_wait_atom::value, str("tok"), str("dep"), str("never"), int64_t{150});
  REQUIRE_FALSE(timed_out);
  CHECK(timed_out.error().code() == errc::timeout);
  CHECK(std::chrono::steady_clock::now() - t0 >= 150ms);
  CHECK(fx.view().kv_namespaces == std::vector<str>{"dep"});
}

TEST_CASE("head_actor: every client message needs the token") {
  fixture fx;
  using str = std::string;
  auto s = fx.ask<msg::cluster_view>(msg::status_atom::value, str("nope"));
  REQUIRE_FALSE(s);
  CHECK(s.error().message().find("wrong cluster token") != str::npos);
  CHECK_FALSE(fx.ask<bool>(msg::kv_set_atom::value, str("nope"), str("d"), str("k"), str("v")));
  CHECK_FALSE(fx.ask<str>(msg::kv_wait_atom::value, str("nope"), str("d"), str("k"), int64_t{1}));
  CHECK_FALSE(fx.ask<bool>(msg::stop_atom::value, str("nope"), 0.0));
  CHECK_FALSE(fx.ask<str>(msg::kv_get_atom::value, str("tok"), str("d"), str("k"))); // never set
  // Heartbeats from nodes that never joined are refused (they must join first).
  auto hb = fx.ask<bool>(msg::heartbeat_atom::value, str("ghost"), uint64_t{1});
  REQUIRE(hb);
  CHECK_FALSE(*hb);
}

TEST_CASE("node_actor: joins, heartbeats, and is declared dead when it goes away") {
  fixture fx;
  std::promise<void> joined;
  auto nc = fx.node("n1", "tok");
  nc.on_joined = [&joined, once = std::make_shared<std::once_flag>()](const std::string&) {
    std::call_once(*once, [&] { joined.set_value(); });
  };
  auto node = fx.sys.spawn(actors::node_actor, nc);
  REQUIRE(joined.get_future().wait_for(5s) == std::future_status::ready);
  // Heartbeats keep it alive well past dead_after.
  std::this_thread::sleep_for(900ms);
  auto v = fx.view();
  REQUIRE(v.nodes.size() == 1);
  CHECK(v.nodes[0].state == "alive");
  CHECK(v.nodes[0].heartbeat_age_ms < 600);
  fx.exit(node, caf::exit_reason::kill);
  CHECK(eventually([&] { return fx.view().nodes[0].state == "dead"; }, 3s));
}

TEST_CASE("node_actor: a wrong token is refused and reported") {
  fixture fx;
  std::promise<std::string> refused;
  auto nc = fx.node("n2", "wrong");
  nc.on_refused = [&refused](const troupe::error& e) { refused.set_value(e.message()); };
  auto node = fx.sys.spawn(actors::node_actor, nc);
  auto f = refused.get_future();
  REQUIRE(f.wait_for(5s) == std::future_status::ready);
  CHECK(f.get().find("wrong cluster token") != std::string::npos);
  CHECK(fx.view().nodes.empty());
  fx.exit(node, caf::exit_reason::user_shutdown);
}

TEST_CASE("head_actor: ignores anonymous exit messages, obeys exits from its own process") {
  fixture fx;
  caf::anon_send_exit(fx.head, caf::exit_reason::user_shutdown); // no sender: refused
  caf::anon_send_exit(fx.head, caf::exit_reason::kill);          // CAF would end any actor on kill
  std::this_thread::sleep_for(100ms);
  CHECK(fx.ask<bool>(msg::kv_set_atom::value, std::string("tok"), std::string("d"),
                     std::string("k"), std::string("v")));
  caf::scoped_actor self{fx.sys};
  self->monitor(fx.head);
  self->send_exit(fx.head, caf::exit_reason::user_shutdown);
  bool down = false;
  self->receive([&](caf::down_msg&) { down = true; }, caf::after(std::chrono::seconds(5)) >> [] {});
  CHECK(down);
}

TEST_CASE("head_actor: stop tells every joined node") {
  fixture fx;
  std::promise<void> joined, told;
  auto nc = fx.node("n3", "tok");
  nc.on_joined = [&joined](const std::string&) { joined.set_value(); };
  nc.on_shutdown = [&told] { told.set_value(); };
  auto node = fx.sys.spawn(actors::node_actor, nc);
  REQUIRE(joined.get_future().wait_for(5s) == std::future_status::ready);
  CHECK(fx.ask<bool>(msg::stop_atom::value, std::string("tok"), 0.0));
  CHECK(told.get_future().wait_for(5s) == std::future_status::ready);
  fx.exit(node, caf::exit_reason::user_shutdown);
}

TEST_CASE("head_actor: heartbeat and leave count only from the node that joined") {
  fixture fx;
  caf::scoped_actor joiner{fx.sys};
  cluster::node_info info;
  info.node_id = "n1";
  info.address = "127.0.0.1";
  uint64_t key = 0;
  joiner->request(fx.head, 5s, msg::join_atom::value, msg::join_request{"tok", "1.0", info})
      .receive([&](const msg::join_reply& r) { key = r.session_key; },
               [&](caf::error& e) { FAIL(fx.sys.render(e)); });
  REQUIRE(key != 0);
  // Another actor with the right key: refused, the node stays alive.
  CHECK_FALSE(*fx.ask<bool>(msg::leave_atom::value, std::string("n1"), key));
  CHECK_FALSE(*fx.ask<bool>(msg::heartbeat_atom::value, std::string("n1"), key));
  auto v = fx.view();
  REQUIRE(v.nodes.size() == 1);
  CHECK(v.nodes[0].state == "alive");
  // The node itself: accepted.
  bool ok = false;
  joiner->request(fx.head, 5s, msg::heartbeat_atom::value, std::string("n1"), key)
      .receive([&](bool b) { ok = b; }, [&](caf::error&) {});
  CHECK(ok);
  joiner->request(fx.head, 5s, msg::leave_atom::value, std::string("n1"), key)
      .receive([&](bool b) { ok = b; }, [&](caf::error&) {});
  CHECK(ok);
  CHECK(fx.view().nodes[0].state == "left");
}
