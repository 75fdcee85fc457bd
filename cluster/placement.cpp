#include "cluster/placement.hpp"

#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "engine/backend/shard.hpp"

namespace troupe::cluster {

namespace {

using free_map = std::map<std::string, std::vector<int32_t>>; // node id -> free devices, ascending

std::string describe_free(const free_map& free) {
  std::string s;
  for (const auto& [node, devs] : free)
    s += fmt::format("{}{}={}", s.empty() ? "" : ", ", node, devs.size());
  return s.empty() ? "no nodes" : s;
}

// The node for one stage's `need` devices: most free first, avoiding `avoid` (the replica's
// previous stages) while another node fits. Empty when none fits.
std::string pick_node(const free_map& free, size_t need, const std::vector<std::string>& avoid) {
  std::string best;
  bool best_avoided = true;
  size_t best_free = 0;
  for (const auto& [node, devs] : free) {
    if (devs.size() < need)
      continue;
    bool avoided = std::find(avoid.begin(), avoid.end(), node) != avoid.end();
    bool better = best.empty() || (best_avoided && !avoided) ||
                  (best_avoided == avoided && devs.size() > best_free);
    if (better) {
      best = node;
      best_avoided = avoided;
      best_free = devs.size();
    }
  }
  return best;
}

// Takes one device from the node with the most free (tensor ranks spread over hosts).
std::pair<std::string, int32_t> take_any(free_map& free) {
  auto it = std::max_element(free.begin(), free.end(), [](const auto& a, const auto& b) {
    return a.second.size() < b.second.size();
  });
  int32_t dev = it->second.front();
  it->second.erase(it->second.begin());
  return {it->first, dev};
}

} // namespace

expected<placement> plan_placement(const parallel_spec& spec, const engine::model_config& model,
                                   const cluster_view& cluster) {
  if (spec.replicas < 1)
    return make_error(errc::invalid_argument, "replicas={} must be at least 1", spec.replicas);
  TROUPE_TRY_VOID(engine::check_parallel_layout(model, spec.tensor, spec.pipeline, spec.expert));
  free_map free;
  size_t total_free = 0;
  for (const auto& n : cluster.nodes) {
    auto devs = n.free_devices;
    std::sort(devs.begin(), devs.end());
    total_free += devs.size();
    free[n.node_id] = std::move(devs);
  }
  const size_t needed = static_cast<size_t>(spec.tensor) * spec.pipeline * spec.replicas;
  if (needed > total_free)
    return make_error(
        errc::resource_exhausted,
        "needs {} devices (tensor={} x pipeline={} x replicas={}), cluster has {} free", needed,
        spec.tensor, spec.pipeline, spec.replicas, total_free);
  placement out{spec, {}};
  for (int r = 0; r < spec.replicas; ++r) {
    std::vector<std::string> used;
    for (int p = 0; p < spec.pipeline; ++p) {
      if (spec.tensor_across_hosts) {
        for (int t = 0; t < spec.tensor; ++t) {
          auto [node, dev] = take_any(free);
          out.ranks.push_back({r, p, t, node, dev});
        }
        continue;
      }
      auto node = pick_node(free, static_cast<size_t>(spec.tensor), used);
      if (node.empty())
        return make_error(errc::resource_exhausted,
                          "replica {} pipeline stage {} needs tensor={} devices on one host; free "
                          "per host: {}",
                          r, p, spec.tensor, describe_free(free));
      auto& devs = free[node];
      for (int t = 0; t < spec.tensor; ++t)
        out.ranks.push_back({r, p, t, node, devs[static_cast<size_t>(t)]});
      devs.erase(devs.begin(), devs.begin() + spec.tensor);
      used.push_back(node);
    }
  }
  return out;
}

} // namespace troupe::cluster
