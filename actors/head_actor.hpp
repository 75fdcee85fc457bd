// head_actor: the cluster's one registry (design.md §1, §7). Admits nodes (token, version),
// tracks heartbeats and lost connections, answers `cluster status`, and serves the key-value
// store. Thin shell around cluster::membership and cluster::kv_store; spawned and published by
// `cluster start --head` (cli/). Event-based; never blocks.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_response_promise.hpp>

#include "cluster/kv_store.hpp"
#include "cluster/membership.hpp"

namespace troupe::actors {

struct head_config {
  std::string token;
  std::string version;
  cluster::membership_options membership;
  std::chrono::milliseconds heartbeat{500}; // period the nodes are told to use
  std::chrono::milliseconds tick{100};      // failure-detection and kv-timeout resolution
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
  bool stopping = false;
  static inline const char* name = "head_actor";
};

caf::behavior head_actor(caf::stateful_actor<head_state>* self, head_config cfg);

} // namespace troupe::actors
