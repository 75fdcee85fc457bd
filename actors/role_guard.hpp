// Who may send what to the control-plane actors (docs/security.md, "Roles"). guarded_actor drops,
// before CAF handles them, the system messages another process must never send: exit messages
// (CAF ends an actor on exit_reason::kill whatever its exit handler), down messages about an
// actor other than their sender, bare error messages (CAF's default error handler ends the
// actor) and stream control messages. refusal_log logs each refused message at most once per
// 10 s per peer. Used by head_actor and node_actor; enqueue runs on any thread.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <string>

#include <caf/actor_control_block.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/mailbox_element.hpp>

namespace troupe::actors {

// "process <CAF node id>" of a sender, or "an anonymous sender".
std::string peer_of(const caf::strong_actor_ptr& sender);

// Whether `sender` runs in the process of `node` (false for anonymous senders).
bool same_process(const caf::strong_actor_ptr& sender, const caf::node_id& node);

// Rate-limited warnings about refused messages: the first refusal of a kind of message from a
// peer is logged at once, later ones at most every `interval` with the count of those not
// logged. Thread-safe.
class refusal_log {
 public:
  explicit refusal_log(std::chrono::seconds interval = std::chrono::seconds(10))
    : interval_(interval) {}
  // `actor` refused `what` (a message of kind `kind`) from `peer`; rate-limited per peer and
  // kind. Returns true when this call wrote a log line.
  bool refuse(const std::string& actor, const std::string& peer, const std::string& kind,
              const std::string& what);
  uint64_t total() const;

 private:
  struct entry {
    std::chrono::steady_clock::time_point last{};
    uint64_t quiet = 0;
  };
  std::chrono::seconds interval_;
  mutable std::mutex mu_;
  std::map<std::string, entry> peers_;
  uint64_t total_ = 0;
};

// Which processes may end an actor with an exit message: its own, `trusted` (a worker's serving
// process), and, when `anonymous` is set, anonymous senders with any reason but kill (CAF's
// anon_send_exit; a remote anonymous sender cannot be told from a local one).
struct exit_policy {
  caf::node_id trusted;
  bool anonymous = false;
};

// Why a message must be dropped before CAF sees it (empty: deliver it). `self` is the receiver's
// node. Exposed for tests.
std::string forbidden_system_message(const caf::mailbox_element& x, const caf::node_id& self,
                                     const exit_policy& exits = {});

class guarded_actor : public caf::event_based_actor {
 public:
  explicit guarded_actor(caf::actor_config& cfg) : caf::event_based_actor(cfg) {}

  void enqueue(caf::mailbox_element_ptr ptr, caf::execution_unit* eu) override;

  // Behaviour handlers refuse a message of another role through this too: logged (rate-limited
  // per peer), nothing else happens.
  void refuse_current(const std::string& kind, const std::string& what);
  uint64_t refused() const { return refusals_.total(); }
  // Set once, in the behaviour function (messages may already be arriving on other threads).
  void set_exit_policy(exit_policy p) {
    std::lock_guard<std::mutex> lock(policy_mu_);
    exits_ = std::move(p);
  }

 private:
  refusal_log refusals_;
  std::mutex policy_mu_;
  exit_policy exits_;
};

} // namespace troupe::actors
