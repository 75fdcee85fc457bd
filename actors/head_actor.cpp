#include "actors/head_actor.hpp"

#include <caf/event_based_actor.hpp>
#include <caf/sec.hpp>

#include "actors/caf_glue.hpp"
#include "cluster/session.hpp"
#include "runtime/log.hpp"
#include "runtime/messages.hpp"

namespace troupe::actors {

namespace {

using head = caf::stateful_actor<head_state>;
using ms = std::chrono::milliseconds;

caf::error refuse(const troupe::error& err) {
  return to_caf(err);
}

caf::result<msg::join_reply> on_join(head* self, const head_config& cfg, msg::join_request& req) {
  auto& st = self->state;
  const uint64_t key = cluster::random_u64();
  auto rec = st.members->join(req.token, req.version, req.info, key, cluster::clock::now());
  if (!rec) {
    log::warn("head: refused join of node {} from {}: {}", req.info.node_id, req.info.address,
              rec.error().message());
    return refuse(rec.error());
  }
  auto sender = caf::actor_cast<caf::actor>(self->current_sender());
  auto& link = st.links[req.info.node_id];
  if (link.actor && link.actor != sender)
    self->demonitor(link.actor);
  link = {sender, rec->incarnation};
  if (sender)
    self->monitor(sender);
  log::info("head: node {} joined from {} ({} GPUs, {} CPUs), incarnation {}", req.info.node_id,
            req.info.address, req.info.resources.gpus.size(), req.info.resources.num_cpus,
            rec->incarnation);
  return msg::join_reply{rec->incarnation, key, static_cast<int32_t>(cfg.heartbeat.count()),
                         cfg.version};
}

void on_down(head* self, const caf::down_msg& dm) {
  auto& st = self->state;
  for (auto& [id, link] : st.links) {
    if (!link.actor || link.actor.address() != dm.source)
      continue;
    std::string why = "connection lost (" + self->system().render(dm.reason) + ")";
    if (st.members->connection_lost(id, link.incarnation, why))
      log::warn("head: node {} is dead: {}", id, why);
    link.actor = nullptr;
  }
}

void on_tick(head* self, const head_config& cfg) {
  auto& st = self->state;
  const auto now = cluster::clock::now();
  for (const auto& id : st.members->expire(now))
    log::warn("head: node {} is dead: {}", id, st.members->find(id)->reason);
  for (auto id : st.kv.expire(now)) {
    auto it = st.waiters.find(id);
    if (it == st.waiters.end())
      continue;
    it->second.deliver(to_caf(make_error(errc::timeout, "kv_wait: key not set in time")));
    st.waiters.erase(it);
  }
  self->delayed_send(self, cfg.tick, msg::tick_atom::value);
}

msg::cluster_view make_view(head* self) {
  auto& st = self->state;
  const auto now = cluster::clock::now();
  msg::cluster_view view{
      .head_version = st.members->version(), .nodes = {}, .kv_namespaces = st.kv.namespaces()};
  for (auto& r : st.members->nodes()) {
    view.nodes.push_back(
        {.info = r.info,
         .state = std::string(cluster::to_string(r.state)),
         .incarnation = r.incarnation,
         .heartbeat_age_ms = std::chrono::duration_cast<ms>(now - r.last_heartbeat).count(),
         .up_ms = std::chrono::duration_cast<ms>(now - r.joined_at).count(),
         .reason = r.reason,
         .gpus_used = r.gpus_used});
  }
  return view;
}

void on_kv_wait(head* self, caf::typed_response_promise<std::string> rp, const std::string& ns,
                const std::string& key, int64_t timeout_ms) {
  auto& st = self->state;
  auto got = st.kv.wait(ns, key, cluster::clock::now() + ms(std::max<int64_t>(0, timeout_ms)));
  if (auto* value = std::get_if<std::string>(&got))
    rp.deliver(*value);
  else
    st.waiters.emplace(std::get<cluster::kv_store::waiter_id>(got), rp);
}

void on_kv_set(head* self, const std::string& ns, const std::string& key,
               const std::string& value) {
  auto& st = self->state;
  for (auto id : st.kv.set(ns, key, value)) {
    auto it = st.waiters.find(id);
    if (it == st.waiters.end())
      continue;
    it->second.deliver(value);
    st.waiters.erase(it);
  }
}

} // namespace

caf::behavior head_actor(caf::stateful_actor<head_state>* self, head_config cfg) {
  self->state.members.emplace(cfg.token, cfg.version, cfg.membership);
  self->set_down_handler([self](caf::down_msg& dm) { on_down(self, dm); });
  // Anyone who can open the port could send an exit message; only this process may stop the head.
  self->set_exit_handler([self](caf::exit_msg& em) {
    const auto& sender = self->current_sender();
    if (!sender || sender->node() != self->node()) {
      log::warn("head: ignored an exit message that did not come from this process");
      return;
    }
    self->quit(em.reason);
  });
  self->send(self, msg::tick_atom::value);
  auto authorized = [self](const std::string& token) {
    return self->state.members->authorize(token);
  };
  return {
      [self, cfg](msg::join_atom, msg::join_request& req) { return on_join(self, cfg, req); },
      [self](msg::heartbeat_atom, const std::string& id, uint64_t key) {
        return self->state.members->heartbeat(id, key, cluster::clock::now()) ==
               cluster::heartbeat_result::ok;
      },
      [self](msg::leave_atom, const std::string& id, uint64_t key) {
        bool left = self->state.members->leave(id, key);
        if (left)
          log::info("head: node {} left the cluster", id);
        return left;
      },
      [self, authorized](msg::status_atom,
                         const std::string& token) -> caf::result<msg::cluster_view> {
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        return make_view(self);
      },
      [self, authorized](msg::kv_set_atom, const std::string& token, const std::string& ns,
                         const std::string& key, const std::string& value) -> caf::result<bool> {
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        on_kv_set(self, ns, key, value);
        return true;
      },
      [self, authorized](msg::kv_get_atom, const std::string& token, const std::string& ns,
                         const std::string& key) -> caf::result<std::string> {
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        if (auto v = self->state.kv.get(ns, key))
          return *v;
        return refuse(
            make_error(errc::not_found, "kv_get: no key '{}' in namespace '{}'", key, ns));
      },
      [self, authorized](msg::kv_wait_atom, const std::string& token, const std::string& ns,
                         const std::string& key, int64_t timeout_ms) {
        auto rp = self->make_response_promise<std::string>();
        if (auto ok = authorized(token); !ok)
          rp.deliver(refuse(ok.error()));
        else
          on_kv_wait(self, rp, ns, key, timeout_ms);
        return rp;
      },
      [self, authorized](msg::stop_atom, const std::string& token) -> caf::result<bool> {
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        self->state.stopping = true;
        for (auto& [id, link] : self->state.links)
          if (link.actor)
            self->send(link.actor, msg::shutdown_atom::value);
        log::info("head: stopping; told {} node(s)", self->state.links.size());
        return true;
      },
      [self, cfg](msg::tick_atom) { on_tick(self, cfg); },
  };
}

} // namespace troupe::actors
