// The head's deployment records as plain C++ (design.md §1, §5): which deployments exist, their
// state, and per replica the devices its ranks hold. Placement of a new deployment turns the
// alive nodes' free devices into ranks (plan_placement); a failed replica releases its devices
// and is placed again on free devices of alive nodes (never a dead one) when there are enough,
// with a new KV namespace, retried with a backoff when its restart fails and whenever devices
// may have come free (a node joined). Called by head_actor only; no I/O; time is passed in.
//
// Deployment state: loading (first load) -> ready <-> degraded (a replica is not serving: failed,
// waiting for devices, or restarting). A replica that fails while the deployment first loads
// fails the deployment (failed; `cluster serve` reports it and the head forgets it).
// Replica state: loading -> ready -> failed -> restarting -> ready, or failed -> waiting (no
// devices) -> restarting; a failed restart goes back to failed with a later retry time.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "cluster/membership.hpp"
#include "cluster/placement.hpp"
#include "engine/model/model_config.hpp"

namespace troupe::cluster {

struct replica_record {
  int index = 0;
  int group = 0;      // index into deployment_record::groups
  std::string ns;     // KV namespace of this replica's current attempt (Gloo/NCCL rendezvous)
  std::string state;  // loading | ready | failed | waiting | restarting
  std::string cause;  // why it last failed
  std::string reason; // the state's explanation, shown by `cluster status`
  std::vector<rank_placement> ranks; // (pp, tp) order; empty while it holds no devices
  int failed_restarts = 0;           // consecutive failed restart attempts (the backoff)
  clock::time_point retry_at{};      // failed or waiting: the next placement attempt
};

// A group of replicas sharing one layout: a deployment's only group, or the decode or prefill
// group of a disaggregated one (role "decode" | "prefill").
struct group_spec {
  std::string role;
  parallel_spec spec;
};

struct deployment_record {
  std::string name;
  std::string ns;    // the first attempt's namespace prefix (deploy/NAME/N)
  std::string state; // loading | ready | degraded | failed
  std::string endpoint, reason;
  parallel_spec spec;             // the first group's layout; replicas: of every group
  std::vector<group_spec> groups; // replicas in group order
  engine::model_config model;     // to place a replica again
  bool cpu_slots = false;
  std::vector<replica_record> replicas;
  int restarts = 0;     // replicas restarted since the deployment was first ready
  std::string transfer; // disaggregated: the KV provider and layout contract, once linked

  // Every rank that holds a device, in (replica, pp, tp) order.
  std::vector<rank_placement> ranks() const;
};

// Retry timing of failed replicas.
struct restart_policy {
  std::chrono::milliseconds waiting_retry{2000}; // no free devices: look again this often
  std::chrono::milliseconds backoff_first{1000}; // after a failed restart: 1 s, 2 s, 4 s, ...
  std::chrono::milliseconds backoff_max{30000};
};

class deployment_registry {
 public:
  explicit deployment_registry(restart_policy policy = {}) : policy_(policy) {}

  // The alive nodes' devices that no deployment holds. cpu_slots (device: cpu deployments): a
  // node without GPUs or stand-ins offers one CPU rank as device 0.
  cluster_view free_view(const std::vector<node_record>& nodes, bool cpu_slots = false) const;

  // Places and records a new deployment (state loading), reserving its devices; replica r's
  // namespace is NS/rR. Fails on a duplicate name or with plan_placement's reason.
  expected<const deployment_record*> add(const std::string& name, const parallel_spec& spec,
                                         const engine::model_config& model,
                                         const std::vector<node_record>& nodes,
                                         bool cpu_slots = false);
  // Several groups (prefill/decode disaggregation): replicas numbered in group order, each
  // group placed on the devices the ones placed before it left (widest tensor first). The
  // reason names the group.
  expected<const deployment_record*> add_groups(const std::string& name,
                                                const std::vector<group_spec>& groups,
                                                const engine::model_config& model,
                                                const std::vector<node_record>& nodes,
                                                bool cpu_slots = false);
  // Forgets a deployment and frees its devices; false when there is none of that name.
  bool remove(const std::string& name);
  deployment_record* find(const std::string& name);
  // The first load finished: the deployment and each replica are ready.
  bool mark_ready(const std::string& name);

  // A replica identified by its current attempt's namespace.
  struct replica_ref {
    std::string name;
    int replica = 0;
    std::string ns;
  };
  // The replica whose attempt is `ns` failed (a worker died or failed a step, its node died, or
  // its restart failed): it releases its devices and is due for placement again (at once after
  // serving; with a backoff after a failed restart). While the deployment first loads, the
  // deployment fails instead. Returns false for an unknown or stale namespace or a replica
  // that is not running (already failed).
  bool fail_replica(const std::string& name, const std::string& ns, const std::string& why,
                    clock::time_point now);
  // fail_replica for every running replica with a rank on `node_id`; returns the replicas failed.
  std::vector<replica_ref> fail_node(const std::string& node_id, const std::string& why,
                                     clock::time_point now);

  // Failed or waiting replicas of degraded deployments whose retry time has come.
  std::vector<replica_ref> due(clock::time_point now) const;
  // Places a failed or waiting replica on free devices of alive nodes under a new namespace
  // (state restarting). Without enough free devices it waits (state waiting, retried after
  // waiting_retry) and returns the reason: "replica 1 waiting for devices: needs 2 devices ...".
  expected<const replica_record*> place_replica(const std::string& name, int replica,
                                                const std::vector<node_record>& nodes,
                                                clock::time_point now);
  // The restart of attempt `ns` loaded: the replica serves again; the deployment is ready once
  // every replica is. False for a stale namespace.
  bool replica_ready(const std::string& name, const std::string& ns);
  // Devices may have come free (a node joined): waiting replicas are due now.
  void wake_waiting(clock::time_point now);

  int32_t devices_used(const std::string& node_id) const;
  const std::map<std::string, deployment_record>& all() const { return records_; }

 private:
  void update_state(deployment_record& rec);
  std::chrono::milliseconds backoff(int failed_restarts) const;

  restart_policy policy_;
  std::map<std::string, deployment_record> records_;
  uint64_t attempts_ = 0;
};

} // namespace troupe::cluster
