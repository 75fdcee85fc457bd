// node_actor: one per host, the `cluster join` daemon (and the head's own host inside the head
// process). Connects to the head through CAF's middleman, joins with the token, heartbeats, and
// reconnects on its own when the head goes away or restarts. Spawned by cli/. Event-based; the
// callbacks run on CAF scheduler threads and must not block.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/role_guard.hpp"
#include "cluster/membership.hpp"
#include "runtime/error.hpp"

namespace troupe::actors {

struct node_config {
  std::string head_host; // reached through the middleman, unless local_head is set
  uint16_t head_port = 0;
  caf::actor local_head; // the head_actor of this process (the head's own node)
  std::string token;
  std::string version;
  cluster::node_info info;
  std::chrono::milliseconds connect_timeout{3000};
  int max_missed_heartbeats = 3;
  std::function<void(const std::string& head_version)> on_joined; // every successful join
  std::function<void(const troupe::error&)> on_refused;           // wrong token or version: give up
  std::function<void()> on_shutdown;                              // the head stopped the cluster
};

struct node_state {
  caf::actor head;
  bool joined = false;
  bool joining = false;
  bool connecting = false;
  bool refused = false;
  uint64_t session_key = 0;
  int32_t heartbeat_ms = 500;
  int missed = 0;
  int failed_connects = 0;
  static inline const char* name = "node_actor";
};

// Messages besides the head's: (leave_atom) -> bool, sent by the daemon on SIGTERM;
// (spawn_atom, worker_spec, owner) -> actor: a detached worker_actor for one deployment rank.
// Roles (docs/security.md): spawn and shutdown only from the head's process, leave only from
// this process, reconnect and tick only from itself; others are dropped and logged.
caf::behavior node_actor(caf::stateful_actor<node_state, guarded_actor>* self, node_config cfg);

} // namespace troupe::actors
