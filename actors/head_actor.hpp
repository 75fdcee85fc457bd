// head_actor: the cluster's one registry (design.md §1, §7). Admits nodes (token, version),
// tracks heartbeats and lost connections, answers `cluster status`, and serves the key-value
// store. Thin shell around cluster::membership and cluster::kv_store; spawned and published by
// `cluster start --head` (cli/). Also records deployments: places them (cluster/deployments),
// spawns each one's serving actor and tracks its state. When a replica fails (its node dies, or
// the serving actor reports a worker gone or a failed step) the registry releases its devices,
// the serving actor drops it, and the head places it again on free devices of alive nodes
// (at once, on every tick once its retry time has come, and whenever a node joins) and has the
// serving actor restart it (restart_atom). Event-based; never blocks: a model's config is read
// on a thread of its own (a hung filesystem fails that deployment after read_timeout, nothing
// else), and only small records in its own temp dir are written here. Ready deployments are
// recorded in a deployment_store; a head started over a crashed one's records serves them
// again once their devices are back (`cluster status` shows them as "restoring" until then).
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_response_promise.hpp>

#include <functional>

#include "actors/deployment_store.hpp"
#include "actors/load_display.hpp"
#include "actors/messages.hpp"
#include "actors/role_guard.hpp"
#include "cluster/deployments.hpp"
#include "cluster/kv_store.hpp"
#include "cluster/membership.hpp"

namespace troupe::actors {

struct head_config {
  std::string token;
  std::string version;
  cluster::membership_options membership;
  std::chrono::milliseconds heartbeat{500}; // period the nodes are told to use
  std::chrono::milliseconds tick{100};      // failure-detection and kv-timeout resolution
  // Spawns the serving actor of one deployment in this process (cli/serve: HTTP server and
  // scheduler over remote workers). Unset: `cluster serve` is refused.
  std::function<caf::actor(caf::actor_system&, caf::actor head)> spawn_serving;
  std::chrono::seconds deploy_timeout{600}; // loading weights on every rank
  std::chrono::seconds read_timeout{30};    // reading a model's config.json / GGUF header
  deployment_store store;                   // where ready deployments are recorded
  std::vector<deployment_config> recovered; // a crashed head's deployments, to serve again
};

struct head_state {
  struct node_link {
    caf::actor actor; // the node's node_actor (a proxy when remote)
    uint64_t incarnation = 0;
  };
  std::optional<cluster::membership> members;
  cluster::kv_store kv;
  std::map<cluster::kv_store::waiter_id, caf::typed_response_promise<std::string>> waiters;
  std::map<std::string, node_link> links;
  cluster::deployment_registry deployments;
  std::map<std::string, caf::actor> serving; // deployment name -> its serving actor
  // A deployment whose model config is being read (off this actor's thread).
  struct pending_read {
    deployment_config config;
    std::function<void(expected<msg::deployment_view>)> done;
    cluster::clock::time_point deadline;
    caf::actor client; // the `cluster serve` waiting (null for a restored deployment)
  };
  std::map<uint64_t, pending_read> reads;
  // Deployment name -> the `cluster serve` client waiting for it while it first loads: its
  // ranks' load progress (progress_atom from the serving actor) goes there.
  std::map<std::string, caf::actor> load_clients;
  load_board loads; // every deployment's ranks still loading, for status
  uint64_t next_read = 0;
  // A crashed head's deployments not yet placed again: config, why not yet, attempt running.
  struct restoring {
    deployment_config config;
    std::string reason = "waiting for its nodes to join the restarted head";
    bool attempting = false;
  };
  std::map<std::string, restoring> restore;
  cluster::clock::time_point next_restore{};
  bool stopping = false;
  static inline const char* name = "head_actor";
};

// Every state-changing message is accepted only from the role that may send it
// (docs/security.md): join and kv from members with the token, heartbeat and leave from the node
// that joined (its actor and session key), deploy, undeploy and stop from clients with the token
// but not from a node's process, ready/failed/linked/progress from the deployment's own serving
// actor,
// tick and restart from the head itself. Others are dropped and logged (rate-limited).
caf::behavior head_actor(caf::stateful_actor<head_state, guarded_actor>* self, head_config cfg);

} // namespace troupe::actors
