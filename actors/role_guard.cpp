#include "actors/role_guard.hpp"

#include <caf/downstream_msg.hpp>
#include <caf/error.hpp>
#include <caf/exit_reason.hpp>
#include <caf/system_messages.hpp>
#include <caf/upstream_msg.hpp>

#include "runtime/log.hpp"

namespace troupe::actors {

std::string peer_of(const caf::strong_actor_ptr& sender) {
  if (!sender)
    return "an anonymous sender";
  return "process " + caf::to_string(sender->node());
}

bool same_process(const caf::strong_actor_ptr& sender, const caf::node_id& node) {
  return sender != nullptr && sender->node() == node;
}

bool refusal_log::refuse(const std::string& actor, const std::string& peer, const std::string& kind,
                         const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  ++total_;
  auto& e = peers_[peer + '|' + kind];
  const auto now = std::chrono::steady_clock::now();
  if (e.last != std::chrono::steady_clock::time_point{} && now - e.last < interval_) {
    ++e.quiet;
    return false;
  }
  log::warn("{}: refused {} from {}{}", actor, what, peer,
            e.quiet > 0 ? fmt::format(" ({} more refused since the last such line)", e.quiet)
                        : std::string{});
  e.last = now;
  e.quiet = 0;
  if (peers_.size() > 4096) // a flood of distinct peers: keep the map bounded
    peers_.clear();
  return true;
}

uint64_t refusal_log::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_;
}

std::string forbidden_system_message(const caf::mailbox_element& x, const caf::node_id& self,
                                     const exit_policy& exits) {
  const auto& c = x.content();
  if (c.size() != 1)
    return {};
  const bool local = same_process(x.sender, self);
  if (c.match_element<caf::exit_msg>(0)) {
    const bool trusted = local || (exits.trusted && same_process(x.sender, exits.trusted)) ||
                         (!x.sender && exits.anonymous &&
                          c.get_as<caf::exit_msg>(0).reason != caf::exit_reason::kill);
    return trusted ? std::string{} : std::string("an exit message");
  }
  if (c.match_element<caf::down_msg>(0)) {
    // CAF sends a down message with the actor that went down as its sender (a proxy's for a
    // remote actor); anything else claims another actor's death.
    const auto& dm = c.get_as<caf::down_msg>(0);
    return x.sender && x.sender->address() == dm.source
               ? std::string{}
               : std::string("a down message about an actor other than its sender");
  }
  if (c.match_element<caf::error>(0) && !x.mid.is_response())
    return local ? std::string{} : std::string("a bare error message");
  if (!local && (c.match_element<caf::open_stream_msg>(0) ||
                 c.match_element<caf::upstream_msg>(0) || c.match_element<caf::downstream_msg>(0)))
    return "a stream control message";
  return {};
}

void guarded_actor::enqueue(caf::mailbox_element_ptr ptr, caf::execution_unit* eu) {
  if (ptr) {
    exit_policy exits;
    {
      std::lock_guard<std::mutex> lock(policy_mu_);
      exits = exits_;
    }
    if (auto why = forbidden_system_message(*ptr, node(), exits); !why.empty()) {
      refusals_.refuse(name(), peer_of(ptr->sender), why, why);
      return; // dropped: no state change (none of these is a request)
    }
  }
  caf::event_based_actor::enqueue(std::move(ptr), eu);
}

void guarded_actor::refuse_current(const std::string& kind, const std::string& what) {
  refusals_.refuse(name(), peer_of(current_sender()), kind, what);
}

} // namespace troupe::actors
