#include "actors/node_actor.hpp"

#include <caf/event_based_actor.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/middleman_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"
#include "actors/worker_actor.hpp"
#include "runtime/log.hpp"

namespace troupe::actors {

namespace {

using node = caf::stateful_actor<node_state, guarded_actor>;
using ms = std::chrono::milliseconds;
constexpr ms retry_delay{1000};

void lose_head(node* self, const std::string& why) {
  auto& st = self->state;
  if (st.joined)
    log::warn("node: lost the head: {}; reconnecting", why);
  if (st.head && !self->state.connecting)
    self->demonitor(st.head);
  st.head = nullptr;
  st.joined = false;
  st.joining = false;
  st.missed = 0;
  self->delayed_send(self, retry_delay / 2, msg::reconnect_atom::value);
}

void join(node* self, const node_config& cfg) {
  auto& st = self->state;
  if (!st.head || st.joining)
    return;
  st.joining = true;
  msg::join_request req{cfg.token, cfg.version, cfg.info};
  self->request(st.head, cfg.connect_timeout, msg::join_atom::value, std::move(req))
      .then(
          [self, cfg](const msg::join_reply& reply) {
            auto& st = self->state;
            st.joining = false;
            st.joined = true;
            st.session_key = reply.session_key;
            st.heartbeat_ms = std::max(50, reply.heartbeat_ms);
            st.missed = 0;
            st.failed_connects = 0;
            log::info("node: joined the head as {} (incarnation {})", cfg.info.node_id,
                      reply.incarnation);
            if (cfg.on_joined)
              cfg.on_joined(reply.head_version);
          },
          [self, cfg](const caf::error& e) {
            auto& st = self->state;
            st.joining = false;
            auto err = from_caf(e, &self->system());
            if (e.category() == error_category() &&
                (err.code() == errc::invalid_argument || err.code() == errc::unsupported)) {
              log::error("node: the head refused to admit this node: {}", err.message());
              st.refused = true;
              if (cfg.on_refused)
                cfg.on_refused(err);
              return;
            }
            log::warn("node: join failed: {}; retrying", err.to_string());
            lose_head(self, err.to_string());
          });
}

void connect(node* self, const node_config& cfg) {
  auto& st = self->state;
  if (st.refused || st.joined || st.joining || st.connecting)
    return;
  if (cfg.local_head) {
    st.head = cfg.local_head;
    join(self, cfg);
    return;
  }
  st.connecting = true;
  auto mm = connector(self->system()); // mutual TLS in the daemons
  self->request(mm, cfg.connect_timeout, caf::connect_atom::value, cfg.head_host, cfg.head_port)
      .then(
          [self, cfg](const caf::node_id&, caf::strong_actor_ptr& ptr,
                      const std::set<std::string>&) {
            auto& st = self->state;
            st.connecting = false;
            st.head = caf::actor_cast<caf::actor>(ptr);
            if (!st.head) {
              lose_head(self, "the middleman returned no actor");
              return;
            }
            self->monitor(st.head);
            join(self, cfg);
          },
          [self, cfg](const caf::error& e) {
            auto& st = self->state;
            st.connecting = false;
            if (st.failed_connects++ % 10 == 0) // every ~10 s while the head stays away
              log::warn("node: cannot reach the head at {}:{}: {}", cfg.head_host, cfg.head_port,
                        self->system().render(e));
            self->delayed_send(self, retry_delay, msg::reconnect_atom::value);
          });
}

void heartbeat(node* self, const node_config& cfg) {
  auto& st = self->state;
  self->delayed_send(self, ms(st.heartbeat_ms), msg::tick_atom::value);
  if (!st.joined || !st.head)
    return;
  auto head = st.head;
  self->request(head, ms(2 * st.heartbeat_ms), msg::heartbeat_atom::value, cfg.info.node_id,
                st.session_key)
      .then(
          [self, cfg](bool known) {
            auto& st = self->state;
            st.missed = 0;
            if (!known && st.joined) {
              log::warn("node: the head no longer knows this node; joining again");
              st.joined = false;
              join(self, cfg);
            }
          },
          [self, cfg, head](const caf::error& e) {
            auto& st = self->state;
            if (st.head != head || !st.joined)
              return;
            if (++st.missed >= cfg.max_missed_heartbeats)
              lose_head(self, fmt::format("{} heartbeats unanswered ({})", st.missed,
                                          self->system().render(e)));
          });
}

// The head's process: the head (remote, or this process for the head's own node).
bool from_head_process(node* self) {
  const auto& head = self->state.head;
  return head && same_process(self->current_sender(), head.node());
}

bool from_self(node* self) {
  return self->current_sender() == self->ctrl();
}

} // namespace

caf::behavior node_actor(caf::stateful_actor<node_state, guarded_actor>* self, node_config cfg) {
  self->set_down_handler([self](caf::down_msg& dm) {
    if (self->state.head && dm.source == self->state.head.address())
      lose_head(self, "connection closed (" + self->system().render(dm.reason) + ")");
  });
  self->send(self, msg::reconnect_atom::value);
  self->send(self, msg::tick_atom::value);
  return {
      [self, cfg](msg::reconnect_atom) {
        if (!from_self(self))
          return self->refuse_current("reconnect", "reconnect (only the node sends it to itself)");
        connect(self, cfg);
      },
      [self, cfg](msg::tick_atom) {
        if (!from_self(self))
          return self->refuse_current("tick", "tick (only the node sends it to itself)");
        heartbeat(self, cfg);
      },
      [self, cfg](msg::shutdown_atom) {
        if (!from_head_process(self))
          return self->refuse_current("shutdown", "shutdown (not from the head)");
        log::info("node: the head is stopping the cluster; exiting");
        self->state.joined = false;
        self->state.refused = true; // no reconnect
        if (cfg.on_shutdown)
          cfg.on_shutdown();
      },
      [self, cfg](msg::spawn_atom, msg::worker_spec& spec,
                  caf::actor& owner) -> caf::result<caf::actor> {
        auto& st = self->state;
        if (!from_head_process(self)) {
          self->refuse_current("spawn", "spawn (not from the head's process)");
          return to_caf(make_error(errc::invalid_argument, "spawn: not accepted from this sender"));
        }
        if (!st.joined || !st.head)
          return to_caf(
              make_error(errc::unavailable, "node {} is not joined to the head", cfg.info.node_id));
        worker_context ctx{st.head, cfg.token, cfg.info.address, owner};
        return self->spawn<caf::detached>(worker_actor, std::move(spec), std::move(ctx));
      },
      [self, cfg](msg::leave_atom) -> caf::result<bool> {
        auto& st = self->state;
        if (!same_process(self->current_sender(), self->node())) {
          self->refuse_current("leave", "leave (only this node's daemon sends it)");
          return false;
        }
        st.refused = true; // stop reconnecting
        if (!st.joined || !st.head)
          return false;
        auto rp = self->make_response_promise<bool>();
        self->request(st.head, ms(2000), msg::leave_atom::value, cfg.info.node_id, st.session_key)
            .then([rp](bool ok) mutable { rp.deliver(ok); },
                  [rp](const caf::error&) mutable { rp.deliver(false); });
        return rp;
      },
  };
}

} // namespace troupe::actors
