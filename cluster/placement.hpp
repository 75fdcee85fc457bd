// The placement policy as plain C++: from a deployment's `parallel: {tensor, pipeline, replicas,
// expert}`, its model and the cluster's free devices to a grid of (node, device) per rank, or the
// reason it cannot be placed. The placement actor (not yet wired) and `cluster serve` call
// plan_placement; it does no I/O and does not block.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/model/model_config.hpp"
#include "runtime/error.hpp"

namespace troupe::cluster {

struct parallel_spec {
  int tensor = 1, pipeline = 1, replicas = 1;
  int expert = 0; // MoE expert groups among the tensor ranks (engine/backend/shard.hpp); 0: tensor
  bool tensor_across_hosts = false; // tensor ranks must share a host unless this is set
};

// One alive node as the head sees it: the device indices nothing else holds.
struct node_view {
  std::string node_id;
  std::vector<int32_t> free_devices;
};

struct cluster_view {
  std::vector<node_view> nodes;
};

struct rank_placement {
  int replica = 0, pp_rank = 0, tp_rank = 0;
  std::string node_id;
  int32_t device = 0;
};

// ranks in (replica, pp_rank, tp_rank) order: replica r's world rank w is ranks[r * tp * pp + w].
struct placement {
  parallel_spec spec;
  std::vector<rank_placement> ranks;
};

// Tensor ranks of a stage on one host (unless tensor_across_hosts), pipeline stages of a replica
// on different hosts where there are enough, nodes with the most free devices first (ties by
// node id). Errors say why, e.g. "num_attention_heads=40 is not divisible by tensor=3" or
// "needs 16 devices, cluster has 12 free".
expected<placement> plan_placement(const parallel_spec& spec, const engine::model_config& model,
                                   const cluster_view& cluster);

} // namespace troupe::cluster
