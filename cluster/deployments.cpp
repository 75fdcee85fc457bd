#include "cluster/deployments.hpp"

#include <algorithm>

#include <fmt/format.h>


namespace troupe::cluster {

cluster_view deployment_registry::free_view(const std::vector<node_record>& nodes,
                                            bool cpu_slots) const {
  cluster_view view;
  for (const auto& n : nodes) {
    if (n.state != node_state::alive)
      continue;
    node_view v{n.info.node_id, {}};
    std::vector<int32_t> devices;
    for (const auto& g : n.info.resources.gpus)
      devices.push_back(g.index);
    if (devices.empty() && cpu_slots)
      devices.push_back(0);
    for (int32_t d : devices) {
      bool held = false;
      for (const auto& [name, rec] : records_)
        for (const auto& r : rec.where.ranks)
          held |= r.node_id == n.info.node_id && r.device == d;
      if (!held)
        v.free_devices.push_back(d);
    }
    view.nodes.push_back(std::move(v));
  }
  return view;
}

expected<const deployment_record*>
deployment_registry::add(const std::string& name, const parallel_spec& spec,
                         const engine::model_config& model, const std::vector<node_record>& nodes,
                         bool cpu_slots) {
  if (records_.count(name))
    return make_error(errc::invalid_argument,
                      "a deployment named '{}' exists already (cluster serve --stop {} first)",
                      name, name);
  auto where = plan_placement(spec, model, free_view(nodes, cpu_slots));
  if (!where)
    return std::move(where).error();
  auto& rec = records_[name];
  rec = {.name = name,
         .ns = fmt::format("deploy/{}/{}", name, ++attempts_),
         .state = "loading",
         .endpoint = {},
         .reason = {},
         .where = std::move(*where)};
  return &rec;
}

bool deployment_registry::remove(const std::string& name) {
  return records_.erase(name) > 0;
}

deployment_record* deployment_registry::find(const std::string& name) {
  auto it = records_.find(name);
  return it == records_.end() ? nullptr : &it->second;
}

std::vector<std::string> deployment_registry::fail_node(const std::string& node_id,
                                                        const std::string& why) {
  std::vector<std::string> failed;
  for (auto& [name, rec] : records_) {
    bool hit = std::any_of(rec.where.ranks.begin(), rec.where.ranks.end(),
                           [&](const rank_placement& r) { return r.node_id == node_id; });
    if (!hit || rec.state == "failed")
      continue;
    rec.state = "failed";
    rec.reason = fmt::format("node {} holding a rank died: {}", node_id, why);
    failed.push_back(name);
  }
  return failed;
}

int32_t deployment_registry::devices_used(const std::string& node_id) const {
  int32_t n = 0;
  for (const auto& [name, rec] : records_)
    for (const auto& r : rec.where.ranks)
      n += r.node_id == node_id;
  return n;
}

} // namespace troupe::cluster
