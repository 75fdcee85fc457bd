// plan_placement: the grid it builds and every reason it refuses, checked word for word.
#include <doctest/doctest.h>

#include "cluster/placement.hpp"

using namespace troupe;
using namespace troupe::cluster;

namespace {

engine::model_config model(int64_t heads = 32, int64_t kv_heads = 8, int64_t layers = 24) {
  engine::model_config c;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.num_layers = layers;
  c.intermediate_size = 4096;
  c.vocab_size = 32000;
  return c;
}

node_view node(std::string id, int devices) {
  node_view n{std::move(id), {}};
  for (int d = 0; d < devices; ++d)
    n.free_devices.push_back(d);
  return n;
}

std::string refusal(const parallel_spec& spec, const engine::model_config& m,
                    const cluster_view& c) {
  auto r = plan_placement(spec, m, c);
  return r ? "" : r.error().message();
}

} // namespace

TEST_CASE("placement: tensor inside a host, pipeline stages on different hosts") {
  cluster_view c{{node("a", 4), node("b", 4), node("c", 2)}};
  auto p = plan_placement({.tensor = 4, .pipeline = 2}, model(), c);
  REQUIRE(p.has_value());
  REQUIRE(p->ranks.size() == 8);
  for (int t = 0; t < 4; ++t) {
    CHECK(p->ranks[t].node_id == "a");
    CHECK(p->ranks[t].device == t);
    CHECK(p->ranks[4 + t].node_id == "b");
    CHECK(p->ranks[4 + t].pp_rank == 1);
    CHECK(p->ranks[4 + t].tp_rank == t);
  }
}

TEST_CASE("placement: stages share a host when no other host fits, busiest-free node first") {
  cluster_view c{{node("small", 1), {"big", {3, 1, 0, 2, 5, 7}}}};
  auto p = plan_placement({.tensor = 2, .pipeline = 2, .replicas = 1}, model(), c);
  REQUIRE(p.has_value());
  CHECK(p->ranks[0].node_id == "big");
  CHECK(p->ranks[0].device == 0);
  CHECK(p->ranks[1].device == 1);
  CHECK(p->ranks[2].node_id == "big");
  CHECK(p->ranks[2].device == 2);
  CHECK(p->ranks[3].device == 3);
}

TEST_CASE("placement: tensor_across_hosts spreads a stage's ranks") {
  cluster_view c{{node("a", 1), node("b", 1)}};
  auto p = plan_placement({.tensor = 2, .tensor_across_hosts = true}, model(), c);
  REQUIRE(p.has_value());
  CHECK(p->ranks[0].node_id != p->ranks[1].node_id);
}

TEST_CASE("placement rejections") {
  cluster_view twelve{{node("a", 8), node("b", 4)}};
  CHECK(refusal({.tensor = 3}, model(40, 8), twelve) ==
        "num_attention_heads=40 is not divisible by tensor=3");
  CHECK(refusal({.tensor = 4}, model(32, 6), twelve) ==
        "num_key_value_heads=6 is not divisible by tensor=4");
  CHECK(refusal({.tensor = 8, .pipeline = 2}, model(), twelve) ==
        "needs 16 devices (tensor=8 x pipeline=2 x replicas=1), cluster has 12 free");
  CHECK(refusal({.tensor = 4, .replicas = 4}, model(), twelve) ==
        "needs 16 devices (tensor=4 x pipeline=1 x replicas=4), cluster has 12 free");
  CHECK(refusal({.tensor = 8, .pipeline = 30}, model(), twelve) ==
        "num_hidden_layers=24 is fewer than pipeline=30 stages");
  CHECK(refusal({.replicas = 0}, model(), twelve) == "replicas=0 must be at least 1");
  cluster_view split{{node("a", 3), node("b", 3)}};
  CHECK(refusal({.tensor = 4}, model(), split) ==
        "replica 0 pipeline stage 0 needs tensor=4 devices on one host; free per host: a=3, "
        "b=3");
  CHECK(refusal({.tensor = 2, .replicas = 3}, model(), {{node("a", 3), node("b", 3)}}) ==
        "replica 2 pipeline stage 0 needs tensor=2 devices on one host; free per host: a=1, "
        "b=1");
  CHECK(refusal({.tensor = 0}, model(), twelve) ==
        "tensor=0 and pipeline=1 must both be at least 1");
}
