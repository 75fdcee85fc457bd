// deployment_registry: the head's placement step over alive nodes' free devices, device
// reservations, duplicate names, --stop freeing devices; replicas: their bookkeeping, a dead
// node failing the replicas on it (releasing their devices), placing a failed replica again on
// alive nodes only, "waiting for devices", the restart backoff and stale namespaces.
#include <doctest/doctest.h>

#include "cluster/deployments.hpp"

#include <set>

#include <fmt/format.h>

using namespace troupe;
using namespace troupe::cluster;

namespace {

engine::model_config small_model() {
  engine::model_config c;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.num_layers = 2;
  c.intermediate_size = 64;
  c.vocab_size = 100;
  return c;
}

node_record node(const std::string& id, int gpus, node_state state = node_state::alive) {
  node_record r;
  r.info.node_id = id;
  for (int g = 0; g < gpus; ++g)
    r.info.resources.gpus.push_back({.index = g, .name = "standin", .cpu_standin = true});
  r.state = state;
  return r;
}

size_t free_on(const cluster_view& v, const std::string& id) {
  for (const auto& n : v.nodes)
    if (n.node_id == id)
      return n.free_devices.size();
  return 0;
}

} // namespace

TEST_CASE("deployments: placing reserves devices, duplicates are refused, remove frees them") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 2), node("b", 2),
                                       node("dead", 4, node_state::dead)};
  auto first = reg.add("m", {.tensor = 2, .pipeline = 2}, small_model(), nodes);
  REQUIRE_MESSAGE(first.has_value(), (first ? "" : first.error().message()));
  CHECK((*first)->state == "loading");
  CHECK((*first)->ranks().size() == 4);
  CHECK((*first)->ranks()[0].node_id != (*first)->ranks()[2].node_id);
  REQUIRE((*first)->replicas.size() == 1);
  CHECK((*first)->replicas[0].ns == (*first)->ns + "/r0");
  CHECK(reg.devices_used("a") == 2);
  CHECK(free_on(reg.free_view(nodes), "a") == 0);
  CHECK(reg.free_view(nodes).nodes.size() == 2); // the dead node offers nothing

  auto dup = reg.add("m", {}, small_model(), nodes);
  REQUIRE(!dup.has_value());
  CHECK(dup.error().message() ==
        "a deployment named 'm' exists already (cluster serve --stop m first)");
  auto full = reg.add("other", {}, small_model(), nodes);
  REQUIRE(!full.has_value());
  CHECK(full.error().message() ==
        "needs 1 devices (tensor=1 x pipeline=1 x replicas=1), cluster has 0 free");

  const auto ns = (*first)->ns;
  CHECK(reg.remove("m"));
  CHECK_FALSE(reg.remove("m"));
  CHECK(free_on(reg.free_view(nodes), "a") == 2);
  auto again = reg.add("m", {.tensor = 2}, small_model(), nodes);
  REQUIRE(again.has_value());
  CHECK((*again)->ns != ns); // a fresh rendezvous namespace per attempt
}

TEST_CASE("deployments: a dead node fails the replica on it, which releases all its devices") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 1), node("b", 1)};
  REQUIRE(reg.add("x", {.pipeline = 2}, small_model(), nodes).has_value());
  CHECK(reg.mark_ready("x"));
  const auto now = clock::now();
  CHECK(reg.fail_node("c", "gone", now).empty());
  auto failed = reg.fail_node("b", "connection lost", now);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].name == "x");
  CHECK(failed[0].replica == 0);
  auto* x = reg.find("x");
  CHECK(x->state == "degraded");
  CHECK(x->reason == "replica 0 failed: node b holding a rank died: connection lost");
  CHECK(x->replicas[0].state == "failed");
  CHECK(reg.devices_used("a") == 0); // the surviving stage's device is released too
  CHECK(reg.devices_used("b") == 0);
  CHECK(reg.fail_node("b", "again", now).empty()); // not running any more
  CHECK(reg.due(now).size() == 1);
}

TEST_CASE("deployments: a replica failing while the deployment first loads fails it") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 1), node("b", 1)};
  REQUIRE(reg.add("x", {.replicas = 2}, small_model(), nodes).has_value());
  auto failed = reg.fail_node("b", "connection lost", clock::now());
  REQUIRE(failed.size() == 1);
  CHECK(reg.find("x")->state == "failed");
  CHECK(reg.find("x")->reason.find("failed while loading: node b holding a rank died") !=
        std::string::npos);
  CHECK(reg.due(clock::now()).empty()); // no restart: `cluster serve` reports the failure
  CHECK_FALSE(reg.mark_ready("x"));
}

TEST_CASE("deployments: replicas get their own devices and namespaces") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 2), node("b", 2), node("c", 1)};
  auto d = reg.add("m", {.tensor = 2, .replicas = 2}, small_model(), nodes);
  REQUIRE_MESSAGE(d.has_value(), (d ? "" : d.error().message()));
  const auto& rec = **d;
  REQUIRE(rec.replicas.size() == 2);
  CHECK(rec.replicas[0].ns == rec.ns + "/r0");
  CHECK(rec.replicas[1].ns == rec.ns + "/r1");
  for (int r = 0; r < 2; ++r) {
    const auto& rep = rec.replicas[static_cast<size_t>(r)];
    CHECK(rep.index == r);
    CHECK(rep.state == "loading");
    REQUIRE(rep.ranks.size() == 2);
    CHECK(rep.ranks[0].node_id == rep.ranks[1].node_id); // tensor ranks share a host
    CHECK(rep.ranks[0].replica == r);
    CHECK(rep.ranks[1].replica == r);
  }
  CHECK(rec.replicas[0].ranks[0].node_id != rec.replicas[1].ranks[0].node_id);
  CHECK(reg.devices_used("a") == 2);
  CHECK(reg.devices_used("b") == 2);
  CHECK(reg.devices_used("c") == 0);
  auto ranks = rec.ranks();
  REQUIRE(ranks.size() == 4);
  CHECK(ranks[0].replica == 0);
  CHECK(ranks[3].replica == 1);
  CHECK(reg.mark_ready("m"));
  CHECK(reg.find("m")->replicas[1].state == "ready");
}

TEST_CASE("deployments: a failed replica is placed again on alive nodes, under a new namespace") {
  deployment_registry reg;
  std::vector<node_record> nodes{node("a", 2), node("b", 2)};
  REQUIRE(reg.add("m", {.tensor = 2, .replicas = 2}, small_model(), nodes).has_value());
  REQUIRE(reg.mark_ready("m"));
  auto* m = reg.find("m");
  const int lost = m->replicas[0].ranks[0].node_id == "b" ? 0 : 1; // the replica on b
  const std::string old_ns = m->replicas[static_cast<size_t>(lost)].ns;
  auto now = clock::now();
  nodes[1].state = node_state::dead;
  REQUIRE(reg.fail_node("b", "connection lost", now).size() == 1);
  CHECK(m->state == "degraded");
  CHECK(m->replicas[static_cast<size_t>(1 - lost)].state == "ready"); // the other one serves on

  // No free devices on alive nodes: it waits, with the reason, and is retried later.
  auto wait = reg.place_replica("m", lost, nodes, now);
  REQUIRE_FALSE(wait.has_value());
  const std::string expected_reason = fmt::format(
      "replica {} waiting for devices: needs 2 devices (tensor=2 x pipeline=1 x replicas=1), "
      "cluster has 0 free (it failed: node b holding a rank died: connection lost)",
      lost);
  CHECK(wait.error().message() == expected_reason);
  CHECK(m->state == "degraded");
  CHECK(m->reason == expected_reason);
  CHECK(m->replicas[static_cast<size_t>(lost)].state == "waiting");
  CHECK(reg.due(now).empty());
  CHECK(reg.due(now + std::chrono::seconds(2)).size() == 1);
  reg.wake_waiting(now); // a node joined
  REQUIRE(reg.due(now).size() == 1);

  // A spare node joins; the dead one is never used even though its devices look free.
  nodes.push_back(node("c", 2));
  auto placed = reg.place_replica("m", lost, nodes, now);
  REQUIRE_MESSAGE(placed.has_value(), (placed ? "" : placed.error().message()));
  CHECK((*placed)->state == "restarting");
  CHECK((*placed)->ns != old_ns);
  REQUIRE((*placed)->ranks.size() == 2);
  for (const auto& r : (*placed)->ranks) {
    CHECK(r.node_id == "c");
    CHECK(r.replica == lost);
  }
  CHECK(reg.devices_used("c") == 2);
  CHECK(m->state == "degraded");
  CHECK(m->reason.find("restarting on c") != std::string::npos);

  // A stale report (the old attempt) changes nothing; the new attempt's success makes it ready.
  CHECK_FALSE(reg.fail_replica("m", old_ns, "late failure of the old workers", now));
  CHECK_FALSE(reg.replica_ready("m", old_ns));
  CHECK(reg.replica_ready("m", (*placed)->ns));
  CHECK(m->state == "ready");
  CHECK(m->reason.empty());
  CHECK(m->restarts == 1);
}

TEST_CASE("deployments: a failed restart backs off, and --stop frees a restarting replica") {
  deployment_registry reg({.waiting_retry = std::chrono::milliseconds(2000),
                           .backoff_first = std::chrono::milliseconds(1000),
                           .backoff_max = std::chrono::milliseconds(3000)});
  const std::vector<node_record> nodes{node("a", 1), node("b", 1)};
  REQUIRE(reg.add("m", {}, small_model(), nodes).has_value());
  REQUIRE(reg.mark_ready("m"));
  auto now = clock::now();
  const std::string ns0 = reg.find("m")->replicas[0].ns;
  REQUIRE(reg.fail_replica("m", ns0, "deployment worker failure: rank 0 is gone", now));
  CHECK_FALSE(reg.fail_replica("m", ns0, "twice", now));
  using std::chrono::seconds;
  for (int attempt = 1; attempt <= 3; ++attempt) {
    REQUIRE(reg.due(now).size() == 1);
    auto placed = reg.place_replica("m", 0, nodes, now);
    REQUIRE(placed.has_value());
    CHECK(reg.devices_used("a") + reg.devices_used("b") == 1);
    REQUIRE(reg.fail_replica("m", (*placed)->ns, "rank 0 on node a failed to load: oom", now));
    CHECK(reg.devices_used("a") + reg.devices_used("b") == 0);
    const int wait = std::min(1 << (attempt - 1), 3); // 1 s, 2 s, then capped at 3 s
    CHECK(reg.find("m")->reason ==
          fmt::format("replica 0 restart failed (attempt {}; next try in {} s): rank 0 on node a "
                      "failed to load: oom",
                      attempt, wait));
    CHECK(reg.due(now + seconds(wait) - std::chrono::milliseconds(1)).empty());
    now += seconds(wait);
  }
  auto placed = reg.place_replica("m", 0, nodes, now);
  REQUIRE(placed.has_value());
  const std::string restarting_ns = (*placed)->ns;
  CHECK(reg.devices_used("a") + reg.devices_used("b") == 1);
  CHECK(reg.remove("m")); // --stop while it restarts
  CHECK(reg.devices_used("a") + reg.devices_used("b") == 0);
  CHECK_FALSE(reg.replica_ready("m", restarting_ns));
}

TEST_CASE("deployments: for device cpu a node without devices offers one CPU rank") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("head", 0)};
  CHECK(free_on(reg.free_view(nodes), "head") == 0);
  CHECK(free_on(reg.free_view(nodes, true), "head") == 1);
  auto d = reg.add("cpu", {}, small_model(), nodes, true);
  REQUIRE(d.has_value());
  CHECK(reg.devices_used("head") == 1);
  CHECK_FALSE(reg.add("cpu2", {}, small_model(), nodes, true).has_value());
}

TEST_CASE("deployments: prefill and decode groups are placed one after the other") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 2), node("b", 2)};
  const std::vector<group_spec> groups{{"decode", {.tensor = 1, .replicas = 2}},
                                       {"prefill", {.tensor = 2, .replicas = 1}}};
  auto rec = reg.add_groups("pd", groups, small_model(), nodes);
  REQUIRE_MESSAGE(rec.has_value(), (rec ? "" : rec.error().message()));
  REQUIRE((*rec)->replicas.size() == 3);
  CHECK((*rec)->groups.size() == 2);
  CHECK((*rec)->replicas[0].group == 0);
  CHECK((*rec)->replicas[1].group == 0);
  CHECK((*rec)->replicas[2].group == 1);
  CHECK((*rec)->replicas[2].ns == (*rec)->ns + "/r2");
  // Every device is held once: 1 + 1 decode ranks, 2 prefill ranks on one host.
  std::set<std::pair<std::string, int32_t>> held;
  for (const auto& r : (*rec)->ranks())
    CHECK(held.insert({r.node_id, r.device}).second);
  CHECK(held.size() == 4);
  CHECK((*rec)->replicas[2].ranks.size() == 2);
  CHECK((*rec)->replicas[2].ranks[0].node_id == (*rec)->replicas[2].ranks[1].node_id);
  CHECK((*rec)->replicas[2].ranks[0].replica == 2);

  // A failed prefill replica is placed again with its own group's layout.
  const auto ns = (*rec)->replicas[2].ns;
  REQUIRE(reg.mark_ready("pd"));
  REQUIRE(reg.fail_replica("pd", ns, "gone", clock::now()));
  auto again = reg.place_replica("pd", 2, nodes, clock::now());
  REQUIRE_MESSAGE(again.has_value(), (again ? "" : again.error().message()));
  CHECK((*again)->ranks.size() == 2);

  // A group that does not fit names itself (the wider prefill group took the host first).
  auto big = reg.add_groups(
      "big", {{"decode", {.tensor = 1, .replicas = 1}}, {"prefill", {.tensor = 2, .replicas = 1}}},
      small_model(), {node("c", 2)});
  REQUIRE(!big.has_value());
  CHECK_MESSAGE(big.error().message().find("the decode group: needs 1 devices") == 0,
                big.error().message());
}
