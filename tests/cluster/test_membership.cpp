// Membership state machine and KV store, without processes or actors.
#include <doctest/doctest.h>

#include "cluster/kv_store.hpp"
#include "cluster/membership.hpp"
#include "cluster/session.hpp"

using namespace troupe;
using namespace troupe::cluster;
using namespace std::chrono_literals;

namespace {

node_info make_node(const std::string& id, const std::string& address = "10.0.0.2") {
  node_info n;
  n.node_id = id;
  n.address = address;
  n.resources.num_cpus = 8;
  n.resources.gpus.push_back({.index = 0, .name = "cpu", .cpu_standin = true});
  return n;
}

} // namespace

TEST_CASE("membership: join with the right token and version is admitted") {
  membership m("secret", "0.1.0");
  const auto t0 = clock::now();
  auto r = m.join("secret", "0.1.0", make_node("a"), 42, t0);
  REQUIRE(r);
  CHECK(r->incarnation == 1);
  CHECK(r->state == node_state::alive);
  CHECK(m.nodes().size() == 1);
  CHECK(m.heartbeat("a", 42, t0 + 100ms) == heartbeat_result::ok);
}

TEST_CASE("membership: a wrong token is refused with the reason") {
  membership m("secret", "0.1.0");
  auto r = m.join("guess", "0.1.0", make_node("a"), 1, clock::now());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == errc::invalid_argument);
  CHECK(r.error().message().find("wrong cluster token") != std::string::npos);
  CHECK(m.nodes().empty());
  CHECK_FALSE(m.authorize("guess"));
  CHECK(m.authorize("secret"));
  CHECK_FALSE(m.authorize(""));
  CHECK_FALSE(m.authorize("secret2"));
}

TEST_CASE("membership: a version mismatch names both versions") {
  membership m("t", "0.1.0");
  auto r = m.join("t", "0.2.0", make_node("a"), 1, clock::now());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == errc::unsupported);
  CHECK(r.error().message().find("0.1.0") != std::string::npos);
  CHECK(r.error().message().find("0.2.0") != std::string::npos);
}

TEST_CASE("membership: silence beyond dead_after marks a node dead, rejoin revives it") {
  membership m("t", "v", {.dead_after = 2500ms});
  const auto t0 = clock::now();
  REQUIRE(m.join("t", "v", make_node("a"), 7, t0));
  REQUIRE(m.join("t", "v", make_node("b"), 8, t0));
  CHECK(m.heartbeat("b", 8, t0 + 2000ms) == heartbeat_result::ok);
  CHECK(m.expire(t0 + 2400ms).empty());
  auto dead = m.expire(t0 + 2600ms);
  REQUIRE(dead.size() == 1);
  CHECK(dead[0] == "a");
  CHECK(m.find("a")->state == node_state::dead);
  CHECK(m.find("a")->reason.find("no heartbeat") != std::string::npos);
  CHECK(m.find("b")->state == node_state::alive);
  // A late heartbeat from the dead node is not enough: it must join again.
  CHECK(m.heartbeat("a", 7, t0 + 2700ms) == heartbeat_result::rejoin);
  auto again = m.join("t", "v", make_node("a"), 9, t0 + 3000ms);
  REQUIRE(again);
  CHECK(again->incarnation == 2);
  CHECK(m.find("a")->state == node_state::alive);
  CHECK(m.heartbeat("a", 7, t0 + 3100ms) == heartbeat_result::rejoin); // old session key
  CHECK(m.heartbeat("a", 9, t0 + 3100ms) == heartbeat_result::ok);
  CHECK(m.nodes().size() == 2); // same identity, not a second row
}

TEST_CASE("membership: a lost connection kills only the current incarnation") {
  membership m("t", "v");
  const auto t0 = clock::now();
  REQUIRE(m.join("t", "v", make_node("a"), 1, t0));
  REQUIRE(m.join("t", "v", make_node("a"), 2, t0 + 1s)); // reconnected: incarnation 2
  CHECK_FALSE(m.connection_lost("a", 1, "old connection closed"));
  CHECK(m.find("a")->state == node_state::alive);
  CHECK(m.connection_lost("a", 2, "connection closed"));
  CHECK(m.find("a")->state == node_state::dead);
  CHECK(m.find("a")->reason == "connection closed");
  CHECK_FALSE(m.connection_lost("nobody", 1, "x"));
}

TEST_CASE("membership: leave needs the session key, unknown nodes must join") {
  membership m("t", "v");
  const auto t0 = clock::now();
  REQUIRE(m.join("t", "v", make_node("a"), 5, t0));
  CHECK_FALSE(m.leave("a", 6));
  CHECK(m.leave("a", 5));
  CHECK(m.find("a")->state == node_state::left);
  CHECK(m.expire(t0 + 1h).empty()); // left nodes are not declared dead
  CHECK(m.heartbeat("zzz", 5, t0) == heartbeat_result::rejoin);
  CHECK_FALSE(m.join("t", "v", make_node(""), 1, t0));
}

TEST_CASE("tokens_equal compares whole strings") {
  CHECK(tokens_equal("abc", "abc"));
  CHECK_FALSE(tokens_equal("abc", "abd"));
  CHECK_FALSE(tokens_equal("abc", "ab"));
  CHECK_FALSE(tokens_equal("ab", "abc"));
  CHECK(tokens_equal("", ""));
}

TEST_CASE("kv_store: set/get are namespaced") {
  kv_store kv;
  CHECK(kv.set("dep1", "nccl_id", "AAA").empty());
  kv.set("dep2", "nccl_id", "BBB");
  CHECK(kv.get("dep1", "nccl_id") == "AAA");
  CHECK(kv.get("dep2", "nccl_id") == "BBB");
  CHECK_FALSE(kv.get("dep3", "nccl_id"));
  CHECK(kv.namespaces() == std::vector<std::string>{"dep1", "dep2"});
  CHECK(kv.erase("dep1", "nccl_id"));
  CHECK_FALSE(kv.get("dep1", "nccl_id"));
  CHECK(kv.namespaces() == std::vector<std::string>{"dep2"});
}

TEST_CASE("kv_store: wait is answered by a later set or expires at its deadline") {
  kv_store kv;
  const auto t0 = kv_store::clock::now();
  auto w1 = kv.wait("d", "k", t0 + 1s);
  auto w2 = kv.wait("d", "k", t0 + 5s);
  auto w3 = kv.wait("other", "k", t0 + 1s);
  REQUIRE(std::holds_alternative<kv_store::waiter_id>(w1));
  REQUIRE(std::holds_alternative<kv_store::waiter_id>(w2));
  CHECK(kv.expire(t0 + 500ms).empty());
  auto expired = kv.expire(t0 + 1500ms);
  CHECK(expired.size() == 2); // w1 and w3
  auto done = kv.set("d", "k", "v");
  REQUIRE(done.size() == 1);
  CHECK(done[0] == std::get<kv_store::waiter_id>(w2));
  auto now = kv.wait("d", "k", t0);
  REQUIRE(std::holds_alternative<std::string>(now));
  CHECK(std::get<std::string>(now) == "v");
  (void)w3;
}

TEST_CASE("kv_store: dropping a namespace fails its waiters") {
  kv_store kv;
  kv.set("d", "a", "1");
  auto w = kv.wait("d", "b", kv_store::clock::now() + 1h);
  auto failed = kv.drop_namespace("d");
  REQUIRE(failed.size() == 1);
  CHECK(failed[0] == std::get<kv_store::waiter_id>(w));
  CHECK(kv.size("d") == 0);
}

TEST_CASE("session: addresses parse and route") {
  auto a = parse_address("10.1.2.3:7000", 6380);
  REQUIRE(a);
  CHECK(a->first == "10.1.2.3");
  CHECK(a->second == 7000);
  auto b = parse_address("headhost", 6380);
  REQUIRE(b);
  CHECK(b->second == 6380);
  CHECK_FALSE(parse_address("h:0", 1));
  CHECK_FALSE(parse_address("h:70000", 1));
  CHECK_FALSE(parse_address("h:12x", 1));
  CHECK_FALSE(parse_address(":80", 1));
  auto local = route_source_address("127.0.0.1");
  REQUIRE(local);
  CHECK(*local == "127.0.0.1");
}

TEST_CASE("session: node ids are stable across restarts") {
  auto dir = std::filesystem::temp_directory_path() /
             ("troupe_session_test_" + std::to_string(random_u64()));
  auto a = stable_node_id(dir, "node");
  auto b = stable_node_id(dir, "node");
  auto c = stable_node_id(dir, "head");
  REQUIRE(a);
  REQUIRE(b);
  REQUIRE(c);
  CHECK(*a == *b);
  CHECK(*a != *c);
  auto s1 = open_session(dir, true);
  REQUIRE(s1);
  REQUIRE(write_pid_file(*s1, "node"));
  CHECK(live_pid(*s1, "node").has_value() == true); // this test binary's cmdline has "cluster"
  std::filesystem::remove_all(dir);
}
