// deployment_registry: the head's placement step over alive nodes' free devices, device
// reservations, duplicate names, --stop freeing devices, and a dead node failing its deployments.
#include <doctest/doctest.h>

#include "cluster/deployments.hpp"

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

TEST_CASE("deployments: placing reserves devices; duplicates refused; remove frees them") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 2), node("b", 2), node("dead", 4, node_state::dead)};
  auto first = reg.add("m", {.tensor = 2, .pipeline = 2}, small_model(), nodes);
  REQUIRE_MESSAGE(first.has_value(), (first ? "" : first.error().message()));
  CHECK((*first)->state == "loading");
  CHECK((*first)->where.ranks.size() == 4);
  CHECK((*first)->where.ranks[0].node_id != (*first)->where.ranks[2].node_id);
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

TEST_CASE("deployments: a dead node fails the deployments holding a rank on it") {
  deployment_registry reg;
  const std::vector<node_record> nodes{node("a", 1), node("b", 1)};
  REQUIRE(reg.add("x", {.pipeline = 2}, small_model(), nodes).has_value());
  reg.find("x")->state = "ready";
  CHECK(reg.fail_node("c", "gone").empty());
  auto failed = reg.fail_node("b", "connection lost");
  REQUIRE(failed == std::vector<std::string>{"x"});
  CHECK(reg.find("x")->state == "failed");
  CHECK(reg.find("x")->reason == "node b holding a rank died: connection lost");
  CHECK(reg.devices_used("a") == 1); // held until --stop
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
