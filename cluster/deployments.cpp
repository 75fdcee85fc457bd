#include "cluster/deployments.hpp"

#include <algorithm>
#include <set>

#include <fmt/format.h>

namespace troupe::cluster {

namespace {

bool running(const replica_record& r) {
  return r.state == "loading" || r.state == "ready" || r.state == "restarting";
}

replica_record* replica_of(deployment_record& rec, const std::string& ns) {
  for (auto& r : rec.replicas)
    if (r.ns == ns)
      return &r;
  return nullptr;
}

std::string nodes_of(const std::vector<rank_placement>& ranks) {
  std::set<std::string> nodes;
  for (const auto& r : ranks)
    nodes.insert(r.node_id);
  return fmt::format("{}", fmt::join(nodes, ", "));
}

} // namespace

std::vector<rank_placement> deployment_record::ranks() const {
  std::vector<rank_placement> out;
  for (const auto& r : replicas)
    out.insert(out.end(), r.ranks.begin(), r.ranks.end());
  return out;
}

cluster_view deployment_registry::free_view(const std::vector<node_record>& nodes,
                                            bool cpu_slots) const {
  std::set<std::pair<std::string, int32_t>> held;
  for (const auto& [name, rec] : records_)
    for (const auto& r : rec.ranks())
      held.insert({r.node_id, r.device});
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
    for (int32_t d : devices)
      if (!held.count({n.info.node_id, d}))
        v.free_devices.push_back(d);
    view.nodes.push_back(std::move(v));
  }
  return view;
}

expected<const deployment_record*> deployment_registry::add(const std::string& name,
                                                            const parallel_spec& spec,
                                                            const engine::model_config& model,
                                                            const std::vector<node_record>& nodes,
                                                            bool cpu_slots) {
  return add_groups(name, {{"", spec}}, model, nodes, cpu_slots);
}

expected<const deployment_record*>
deployment_registry::add_groups(const std::string& name, const std::vector<group_spec>& groups,
                                const engine::model_config& model,
                                const std::vector<node_record>& nodes, bool cpu_slots) {
  if (records_.count(name))
    return make_error(errc::invalid_argument,
                      "a deployment named '{}' exists already (cluster serve --stop {} first)",
                      name, name);
  if (groups.empty())
    return make_error(errc::invalid_argument, "deployment '{}' has no replicas", name);
  auto view = free_view(nodes, cpu_slots);
  deployment_record rec{.name = name,
                        .ns = fmt::format("deploy/{}/{}", name, attempts_ + 1),
                        .state = "loading",
                        .endpoint = {},
                        .reason = {},
                        .spec = groups.front().spec,
                        .groups = groups,
                        .model = model,
                        .cpu_slots = cpu_slots,
                        .replicas = {},
                        .restarts = 0,
                        .transfer = {}};
  // Replicas are numbered in group order; groups are placed widest tensor group first, so that
  // the single-rank replicas of one group do not scatter over the hosts another group's tensor
  // ranks need together.
  std::vector<int> base(groups.size(), 0);
  rec.spec.replicas = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    base[g] = rec.spec.replicas;
    rec.spec.replicas += groups[g].spec.replicas;
    for (int r = 0; r < groups[g].spec.replicas; ++r)
      rec.replicas.push_back({.index = base[g] + r,
                              .group = static_cast<int>(g),
                              .ns = fmt::format("{}/r{}", rec.ns, base[g] + r),
                              .state = "loading"});
  }
  std::vector<size_t> order(groups.size());
  for (size_t g = 0; g < order.size(); ++g)
    order[g] = g;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return groups[a].spec.tensor > groups[b].spec.tensor;
  });
  for (size_t g : order) {
    auto where = plan_placement(groups[g].spec, model, view);
    if (!where)
      return groups[g].role.empty()
                 ? std::move(where).error()
                 : std::move(where).error().context(fmt::format("the {} group", groups[g].role));
    for (auto rank : where->ranks) {
      rank.replica += base[g];
      for (auto& n : view.nodes)
        if (n.node_id == rank.node_id)
          std::erase(n.free_devices, rank.device);
      rec.replicas.at(static_cast<size_t>(rank.replica)).ranks.push_back(rank);
    }
  }
  ++attempts_;
  auto& out = records_[name] = std::move(rec);
  return &out;
}

bool deployment_registry::remove(const std::string& name) {
  return records_.erase(name) > 0;
}

deployment_record* deployment_registry::find(const std::string& name) {
  auto it = records_.find(name);
  return it == records_.end() ? nullptr : &it->second;
}

bool deployment_registry::mark_ready(const std::string& name) {
  auto* rec = find(name);
  if (!rec || rec->state != "loading")
    return false;
  for (auto& r : rec->replicas)
    r.state = "ready";
  rec->state = "ready";
  rec->reason.clear();
  return true;
}

std::chrono::milliseconds deployment_registry::backoff(int failed_restarts) const {
  auto d = policy_.backoff_first;
  for (int i = 1; i < failed_restarts && d < policy_.backoff_max; ++i)
    d *= 2;
  return std::min(d, policy_.backoff_max);
}

void deployment_registry::update_state(deployment_record& rec) {
  if (rec.state == "loading" || rec.state == "failed")
    return;
  std::string reason;
  for (const auto& r : rec.replicas)
    if (r.state != "ready")
      reason += (reason.empty() ? "" : "; ") + r.reason;
  rec.state = reason.empty() ? "ready" : "degraded";
  rec.reason = std::move(reason);
}

bool deployment_registry::fail_replica(const std::string& name, const std::string& ns,
                                       const std::string& why, clock::time_point now) {
  auto* rec = find(name);
  auto* rep = rec ? replica_of(*rec, ns) : nullptr;
  if (!rep || !running(*rep))
    return false;
  const bool was_restarting = rep->state == "restarting";
  rep->ranks.clear(); // its devices are free for the restart (or other deployments)
  rep->cause = why;
  rep->state = "failed";
  if (rec->state == "loading" || rec->state == "failed") {
    rep->reason = fmt::format("replica {} failed while loading: {}", rep->index, why);
    rec->state = "failed";
    rec->reason = rep->reason;
    return true;
  }
  if (was_restarting) {
    const auto wait = backoff(++rep->failed_restarts);
    rep->reason = fmt::format("replica {} restart failed (attempt {}; next try in {} s): {}",
                              rep->index, rep->failed_restarts,
                              std::chrono::duration_cast<std::chrono::seconds>(wait).count(), why);
    rep->retry_at = now + wait;
  } else {
    rep->reason = fmt::format("replica {} failed: {}", rep->index, why);
    rep->retry_at = now;
  }
  update_state(*rec);
  return true;
}

std::vector<deployment_registry::replica_ref>
deployment_registry::fail_node(const std::string& node_id, const std::string& why,
                               clock::time_point now) {
  std::vector<replica_ref> hit;
  for (const auto& [name, rec] : records_)
    for (const auto& r : rec.replicas)
      if (running(r) && std::any_of(r.ranks.begin(), r.ranks.end(),
                                    [&](const rank_placement& p) { return p.node_id == node_id; }))
        hit.push_back({name, r.index, r.ns});
  for (const auto& h : hit)
    fail_replica(h.name, h.ns, fmt::format("node {} holding a rank died: {}", node_id, why), now);
  return hit;
}

std::vector<deployment_registry::replica_ref>
deployment_registry::due(clock::time_point now) const {
  std::vector<replica_ref> out;
  for (const auto& [name, rec] : records_) {
    if (rec.state != "degraded")
      continue;
    for (const auto& r : rec.replicas)
      if ((r.state == "failed" || r.state == "waiting") && r.retry_at <= now)
        out.push_back({name, r.index, r.ns});
  }
  return out;
}

expected<const replica_record*>
deployment_registry::place_replica(const std::string& name, int replica,
                                   const std::vector<node_record>& nodes, clock::time_point now) {
  auto* rec = find(name);
  if (!rec || replica < 0 || static_cast<size_t>(replica) >= rec->replicas.size())
    return make_error(errc::not_found, "deployment '{}' has no replica {}", name, replica);
  auto& rep = rec->replicas[static_cast<size_t>(replica)];
  if (rep.state != "failed" && rep.state != "waiting")
    return make_error(errc::invalid_argument, "replica {} of '{}' is {}, not failed", replica, name,
                      rep.state);
  auto one = rec->groups.at(static_cast<size_t>(rep.group)).spec;
  one.replicas = 1;
  auto where = plan_placement(one, rec->model, free_view(nodes, rec->cpu_slots));
  if (!where) {
    rep.state = "waiting";
    rep.reason = fmt::format("replica {} waiting for devices: {} (it failed: {})", replica,
                             where.error().message(), rep.cause);
    rep.retry_at = now + policy_.waiting_retry;
    update_state(*rec);
    return make_error(errc::resource_exhausted, "{}", rep.reason);
  }
  rep.ranks = std::move(where->ranks);
  for (auto& r : rep.ranks)
    r.replica = replica;
  rep.ns = fmt::format("deploy/{}/{}/r{}", name, ++attempts_, replica);
  rep.state = "restarting";
  rep.reason = fmt::format("replica {} restarting on {} (it failed: {})", replica,
                           nodes_of(rep.ranks), rep.cause);
  update_state(*rec);
  return &rep;
}

bool deployment_registry::replica_ready(const std::string& name, const std::string& ns) {
  auto* rec = find(name);
  auto* rep = rec ? replica_of(*rec, ns) : nullptr;
  if (!rep || rep->state != "restarting")
    return false;
  rep->state = "ready";
  rep->reason.clear();
  rep->cause.clear();
  rep->failed_restarts = 0;
  ++rec->restarts;
  update_state(*rec);
  return true;
}

void deployment_registry::wake_waiting(clock::time_point now) {
  for (auto& [name, rec] : records_)
    for (auto& r : rec.replicas)
      if (r.state == "waiting")
        r.retry_at = now;
}

int32_t deployment_registry::devices_used(const std::string& node_id) const {
  int32_t n = 0;
  for (const auto& [name, rec] : records_)
    for (const auto& r : rec.ranks())
      n += r.node_id == node_id;
  return n;
}

} // namespace troupe::cluster
