// The head's node registry as a plain state machine: join (token and version checked), heartbeats,
// failure detection by silence or lost connection, graceful leave. Owned by head_actor (actors/),
// unit-tested directly. Not thread-safe; never blocks; time is passed in by the caller.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cluster/resources.hpp"
#include "runtime/error.hpp"

namespace troupe::cluster {

using clock = std::chrono::steady_clock;

// What a node says about itself when it joins.
struct node_info {
  std::string node_id; // stable across restarts of the node daemon (kept in its temp dir)
  std::string address; // the IP other hosts reach it on (the interface that routes to the head)
  std::string hostname;
  bool head_node = false; // the node daemon inside the head process
  host_resources resources;
};

// Which host a node runs on, to share GPU memory between node processes: "hostname/boot id",
// or "" when the node reported no boot id.
std::string host_identity(const node_info& n);

// alive -> dead (silence or lost connection) -> alive (rejoin under the same id);
// alive -> left (graceful stop) -> alive (rejoin).
enum class node_state : uint8_t { alive, dead, left };
std::string_view to_string(node_state s);

struct node_record {
  node_info info;
  node_state state = node_state::alive;
  uint64_t incarnation = 0; // 1 on the first join, +1 on every rejoin
  uint64_t session_key = 0; // secret handed out at join; heartbeats and leave must carry it
  clock::time_point joined_at{};
  clock::time_point last_heartbeat{};
  std::string reason; // why the node is dead or left
  int32_t gpus_used = 0;
};

struct membership_options {
  std::chrono::milliseconds dead_after{2500}; // silence after which an alive node is declared dead
};

enum class heartbeat_result { ok, rejoin }; // rejoin: unknown, dead, stale incarnation or wrong key

class membership {
 public:
  membership(std::string token, std::string version, membership_options options = {});

  // Checks a client's token (status, kv, stop). errc::invalid_argument "authentication failed ...".
  expected<void> authorize(const std::string& token) const;

  // Admits a node (new, or a rejoin of a known id). Refuses a wrong token or another version with
  // a message naming the reason. Returns the new record (incarnation, session key).
  expected<node_record> join(const std::string& token, const std::string& version,
                             const node_info& info, uint64_t session_key, clock::time_point now);
  heartbeat_result heartbeat(const std::string& node_id, uint64_t session_key,
                             clock::time_point now);
  // The transport reported the node's connection closed. Ignored for a stale incarnation.
  bool connection_lost(const std::string& node_id, uint64_t incarnation, const std::string& why);
  bool leave(const std::string& node_id, uint64_t session_key);
  // Declares dead every alive node silent for longer than dead_after; returns their ids.
  std::vector<std::string> expire(clock::time_point now);

  const node_record* find(const std::string& node_id) const;
  std::vector<node_record> nodes() const; // ordered by node id
  const std::string& version() const { return version_; }
  const membership_options& options() const { return options_; }

 private:
  std::string token_, version_;
  membership_options options_;
  std::map<std::string, node_record> nodes_;
};

// Constant-time comparison of two tokens.
bool tokens_equal(const std::string& a, const std::string& b);

} // namespace troupe::cluster
