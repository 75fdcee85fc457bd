// The head's deployment records as plain C++ (design.md §1, §5): which deployments exist, their
// state (loading | ready | failed), the devices their ranks hold, and the placement step that
// turns a new deployment and the alive nodes' free devices into ranks (plan_placement). Called
// by head_actor only; no I/O.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "cluster/membership.hpp"
#include "cluster/placement.hpp"
#include "engine/model/model_config.hpp"

namespace troupe::cluster {

struct deployment_record {
  std::string name;
  std::string ns;              // the deployment's KV namespace (unique per deployment attempt)
  std::string state;           // loading | ready | failed
  std::string endpoint, reason;
  placement where;
};

class deployment_registry {
 public:
  // The alive nodes' devices that no deployment holds. cpu_slots (device: cpu deployments): a
  // node without GPUs or stand-ins offers one CPU rank as device 0.
  cluster_view free_view(const std::vector<node_record>& nodes, bool cpu_slots = false) const;

  // Places and records a new deployment (state loading), reserving its devices. Fails on a
  // duplicate name or with plan_placement's reason.
  expected<const deployment_record*> add(const std::string& name, const parallel_spec& spec,
                                         const engine::model_config& model,
                                         const std::vector<node_record>& nodes,
                                         bool cpu_slots = false);
  // Forgets a deployment and frees its devices; false when there is none of that name.
  bool remove(const std::string& name);
  deployment_record* find(const std::string& name);

  // Marks failed every deployment with a rank on `node_id`; returns their names.
  std::vector<std::string> fail_node(const std::string& node_id, const std::string& why);
  int32_t devices_used(const std::string& node_id) const;
  const std::map<std::string, deployment_record>& all() const { return records_; }

 private:
  std::map<std::string, deployment_record> records_;
  uint64_t attempts_ = 0;
};

} // namespace troupe::cluster
