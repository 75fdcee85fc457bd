#include "actors/head_actor.hpp"

#include <thread>

#include <caf/event_based_actor.hpp>
#include <caf/sec.hpp>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"
#include "cluster/session.hpp"
#include "engine/model/gguf_weights.hpp"
#include "runtime/log.hpp"

namespace troupe::actors::detail {
// A model's config as read by a thread of its own (peeked_atom, read id, this).
struct model_peek {
  std::shared_ptr<const expected<engine::model_config>> result;
};
} // namespace troupe::actors::detail

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::actors::detail::model_peek)

namespace troupe::actors {

namespace {

using peeked_atom = caf::atom_constant<caf::atom("peeked")>;
using head = caf::stateful_actor<head_state, guarded_actor>;
using deploy_done = std::function<void(expected<msg::deployment_view>)>;
using ms = std::chrono::milliseconds;

void fail_node_deployments(head* self, const std::string& node_id, const std::string& why);
msg::deployment_view view_of(const cluster::deployment_record& rec, const load_board& loads);
void on_state_report(head* self, const std::string& name, const std::string& state,
                     const std::string& reason);
void restart_due(head* self, const head_config& cfg);
void restore_due(head* self, const head_config& cfg);
void drop_namespace(head* self, const std::string& ns);

caf::error refuse(const troupe::error& err) {
  return to_caf(err);
}

// ---- Roles (docs/security.md): who may send what ----

bool from_self(head* self) {
  return self->current_sender() == self->ctrl();
}

// The deployment's own serving actor (spawned by this head, in this process).
bool from_serving(head* self, const std::string& name) {
  auto it = self->state.serving.find(name);
  return it != self->state.serving.end() &&
         self->current_sender() == caf::actor_cast<caf::strong_actor_ptr>(it->second) &&
         same_process(self->current_sender(), self->node());
}

// The node actor that joined as `id`.
bool from_node(head* self, const std::string& id) {
  auto it = self->state.links.find(id);
  return it != self->state.links.end() && it->second.actor &&
         self->current_sender() == caf::actor_cast<caf::strong_actor_ptr>(it->second.actor);
}

// A process other than the head's that runs a joined node (nodes never deploy, undeploy or stop).
bool from_remote_node_process(head* self) {
  const auto& sender = self->current_sender();
  if (!sender || sender->node() == self->node())
    return false;
  for (const auto& [id, link] : self->state.links)
    if (link.actor && link.actor.node() == sender->node())
      return true;
  return false;
}

// Drops the current message (logged, rate-limited per peer and kind); `what` names it and its
// role, its first word is the kind.
void drop(head* self, const std::string& what) {
  self->refuse_current(what.substr(0, what.find(' ')), what);
}

caf::error refuse_role(head* self, const std::string& what) {
  drop(self, what);
  return to_caf(make_error(errc::invalid_argument, "{}: not accepted from this sender", what));
}

caf::result<msg::join_reply> on_join(head* self, const head_config& cfg, msg::join_request& req) {
  auto& st = self->state;
  if (!self->current_sender())
    return refuse_role(self, "join (from an anonymous sender)");
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
  st.deployments.wake_waiting(cluster::clock::now()); // its devices may let a replica restart
  self->send(self, msg::restart_atom::value);
  return msg::join_reply{rec->incarnation, key, static_cast<int32_t>(cfg.heartbeat.count()),
                         cfg.version};
}

void on_down(head* self, const caf::down_msg& dm) {
  auto& st = self->state;
  for (auto& [id, link] : st.links) {
    if (!link.actor || link.actor.address() != dm.source)
      continue;
    std::string why = "connection lost (" + self->system().render(dm.reason) + ")";
    if (st.members->connection_lost(id, link.incarnation, why)) {
      log::warn("head: node {} is dead: {}", id, why);
      fail_node_deployments(self, id, why);
    }
    link.actor = nullptr;
  }
  for (auto it = st.serving.begin(); it != st.serving.end(); ++it) {
    if (it->second.address() != dm.source)
      continue;
    on_state_report(self, it->first, "failed",
                    "its serving actor exited (" + self->system().render(dm.reason) + ")");
    st.serving.erase(it);
    break;
  }
}

void on_tick(head* self, const head_config& cfg) {
  auto& st = self->state;
  const auto now = cluster::clock::now();
  for (const auto& id : st.members->expire(now)) {
    log::warn("head: node {} is dead: {}", id, st.members->find(id)->reason);
    fail_node_deployments(self, id, st.members->find(id)->reason);
  }
  restart_due(self, cfg);
  for (auto it = st.reads.begin(); it != st.reads.end();) {
    if (now < it->second.deadline) {
      ++it;
      continue;
    }
    auto done = std::move(it->second.done);
    const auto model = it->second.config.model;
    it = st.reads.erase(it);
    done(make_error(errc::timeout,
                    "reading the config of model {} took longer than {} s (a hung or very slow "
                    "filesystem?); nothing was deployed",
                    model, cfg.read_timeout.count()));
  }
  if (now >= st.next_restore) {
    st.next_restore = now + std::chrono::seconds(1);
    restore_due(self, cfg);
  }
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
         .gpus_used = st.deployments.devices_used(r.info.node_id)});
  }
  for (const auto& [name, rec] : st.deployments.all())
    view.deployments.push_back(view_of(rec, st.loads));
  for (const auto& [name, r] : st.restore)
    if (!st.deployments.find(name))
      view.deployments.push_back({.name = name,
                                  .state = "restoring",
                                  .reason = r.reason,
                                  .tensor = r.config.parallel.tensor,
                                  .pipeline = r.config.parallel.pipeline,
                                  .replicas = r.config.parallel.replicas,
                                  .device = r.config.device});
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

msg::deployment_view view_of(const cluster::deployment_record& rec, const load_board& loads) {
  msg::deployment_view v{.name = rec.name,
                         .state = rec.state,
                         .endpoint = rec.endpoint,
                         .reason = rec.reason,
                         .tensor = rec.spec.tensor,
                         .pipeline = rec.spec.pipeline,
                         .ranks = {},
                         .replicas = rec.spec.replicas,
                         .replica_states = {},
                         .restarts = rec.restarts,
                         .device = rec.cpu_slots ? "cpu" : "cuda",
                         .groups = {},
                         .transfer = rec.transfer};
  if (rec.groups.size() > 1) {
    int32_t first = 0;
    for (const auto& g : rec.groups) {
      msg::group_view gv{.role = g.role,
                         .tensor = g.spec.tensor,
                         .pipeline = g.spec.pipeline,
                         .replicas = g.spec.replicas,
                         .first_replica = first,
                         .ready = 0};
      for (int32_t k = first; k < first + g.spec.replicas; ++k)
        gv.ready += rec.replicas.at(static_cast<size_t>(k)).state == "ready";
      first += g.spec.replicas;
      v.groups.push_back(std::move(gv));
    }
  }
  for (const auto& r : rec.ranks())
    v.ranks.push_back({r.pp_rank, r.tp_rank, r.node_id, r.device, r.replica});
  for (const auto& r : rec.replicas)
    v.replica_states.push_back(r.state);
  v.loading = loads.lines(rec.name);
  return v;
}

// Ends a deployment's serving actor (its HTTP server, scheduler, and through it its workers).
void stop_serving(head* self, const std::string& name) {
  auto& st = self->state;
  auto it = st.serving.find(name);
  if (it == st.serving.end())
    return;
  self->demonitor(it->second);
  self->send_exit(it->second, caf::exit_reason::user_shutdown);
  st.serving.erase(it);
}

// The serving actor takes a failed replica out of routing and stops its workers; the
// registry has released its devices and the next restart_due places it again.
void drop_replica(head* self, const std::string& name, const std::string& ns) {
  auto& st = self->state;
  const auto* rec = st.deployments.find(name);
  if (!rec)
    return;
  log::warn("head: deployment '{}' is {}: {}", name, rec->state, rec->reason);
  st.loads.forget(name); // the failed attempt's reports; loading ranks report again soon
  drop_namespace(self, ns);
  auto serving = st.serving.find(name);
  if (rec->state != "degraded" || serving == st.serving.end())
    return; // failed while first loading: on_deploy reports it
  for (const auto& rep : rec->replicas)
    if (rep.ns == ns)
      self->send(serving->second, msg::drop_atom::value, static_cast<int32_t>(rep.index), ns,
                 rep.reason);
  self->send(self, msg::restart_atom::value);
}

// Forgets a replica attempt's rendezvous keys; a rank still waiting on one fails at once.
void drop_namespace(head* self, const std::string& ns) {
  auto& st = self->state;
  for (auto id : st.kv.drop_namespace(ns)) {
    auto it = st.waiters.find(id);
    if (it == st.waiters.end())
      continue;
    it->second.deliver(to_caf(make_error(errc::cancelled,
                                         "kv_wait: namespace {} was dropped (its replica "
                                         "attempt failed or was stopped)",
                                         ns)));
    st.waiters.erase(it);
  }
}

// Removes a deployment: its serving actor, its devices, its rendezvous namespaces.
void remove_deployment(head* self, const std::string& name) {
  stop_serving(self, name);
  self->state.load_clients.erase(name);
  self->state.loads.forget(name);
  if (const auto* rec = self->state.deployments.find(name))
    for (const auto& rep : rec->replicas)
      drop_namespace(self, rep.ns);
  self->state.deployments.remove(name);
}

void fail_node_deployments(head* self, const std::string& node_id, const std::string& why) {
  for (const auto& ref : self->state.deployments.fail_node(node_id, why, cluster::clock::now()))
    drop_replica(self, ref.name, ref.ns);
}

// The serving actor reports that a replica's executor failed (a worker died or failed a step).
void on_replica_failed(head* self, const std::string& name, const std::string& ns,
                       const std::string& why) {
  if (self->state.deployments.fail_replica(name, ns, why, cluster::clock::now()))
    drop_replica(self, name, ns);
}

msg::replica_plan plan_of(head* self, const cluster::replica_record& rep) {
  msg::replica_plan plan{.replica = rep.index, .ns = rep.ns, .ranks = {}, .nodes = {}, .hosts = {}};
  for (const auto& r : rep.ranks) {
    plan.ranks.push_back({r.pp_rank, r.tp_rank, r.node_id, r.device, r.replica});
    const auto* node = self->state.members->find(r.node_id);
    plan.hosts.push_back(node != nullptr ? cluster::host_identity(node->info) : std::string());
    auto link = self->state.links.find(r.node_id);
    plan.nodes.push_back(link == self->state.links.end() ? caf::actor{} : link->second.actor);
  }
  return plan;
}

// Places every failed or waiting replica whose retry time has come and has its serving actor
// spawn, load and swap in the new workers; a failed restart is retried with a backoff.
void restart_due(head* self, const head_config& cfg) {
  auto& st = self->state;
  const auto now = cluster::clock::now();
  for (const auto& ref : st.deployments.due(now)) {
    auto serving = st.serving.find(ref.name);
    if (serving == st.serving.end())
      continue;
    const std::string before = st.deployments.find(ref.name)->reason;
    auto placed = st.deployments.place_replica(ref.name, ref.replica, st.members->nodes(), now);
    if (!placed) {
      if (st.deployments.find(ref.name)->reason != before)
        log::warn("head: deployment '{}': {}", ref.name, placed.error().message());
      continue;
    }
    const std::string name = ref.name, ns = (*placed)->ns;
    const int replica = ref.replica;
    log::info("head: deployment '{}': {}", name, (*placed)->reason);
    self->request(serving->second, cfg.deploy_timeout, msg::restart_atom::value,
                  plan_of(self, **placed))
        .then(
            [self, name, ns, replica](const std::string&) {
              if (self->state.deployments.replica_ready(name, ns))
                log::info("head: deployment '{}': replica {} restarted ({}); state {}", name,
                          replica, ns, self->state.deployments.find(name)->state);
            },
            [self, name, ns](caf::error& e) {
              auto err = from_caf(e, &self->system());
              if (self->state.deployments.fail_replica(name, ns, err.message(),
                                                       cluster::clock::now())) {
                log::warn("head: deployment '{}': {}", name,
                          self->state.deployments.find(name)->reason);
                drop_namespace(self, ns);
              }
            });
  }
}

// Checks that need no file, then the model's config is read on a thread of its own (a hung
// filesystem must not stall heartbeats); on_peeked places the deployment when it answers, and
// on_tick gives up after cfg.read_timeout. `done` gets the ready deployment or why it failed.
void start_deployment(head* self, const head_config& cfg, deployment_config dc, deploy_done done,
                      caf::actor client = {}) {
  auto& st = self->state;
  if (!cfg.spawn_serving)
    return done(make_error(errc::unsupported, "this head does not serve deployments"));
  if (dc.disaggregation.enabled && dc.disaggregation.provider == "local")
    return done(make_error(errc::invalid_argument,
                           "deployment '{}': disaggregation.provider 'local' moves KV within one "
                           "process (`cluster serve --block`); across the cluster's processes "
                           "use auto, tcp, verbs, efa or socket",
                           dc.served_model_name));
  const uint64_t id = ++st.next_read;
  const std::string model = dc.model;
  st.reads.emplace(id, head_state::pending_read{std::move(dc), std::move(done),
                                                cluster::clock::now() + cfg.read_timeout,
                                                std::move(client)});
  std::thread([head = self->address(), id, model] {
    detail::model_peek peek{
        std::make_shared<const expected<engine::model_config>>(engine::peek_model_config(model))};
    if (auto h = caf::actor_cast<caf::actor>(head))
      caf::anon_send(h, peeked_atom::value, id, std::move(peek));
  }).detach();
}

// Places the deployment whose model config was read, spawns its serving actor and waits for
// every replica to load.
void place(head* self, const head_config& cfg, deployment_config dc,
           const engine::model_config& model, deploy_done done, const caf::actor& client) {
  auto& st = self->state;
  const std::string name = dc.served_model_name;
  std::string auto_device;
  if (dc.device == "auto") { // cuda when an alive node offers a real GPU, else cpu
    std::vector<cluster::gpu_info> gpus;
    for (const auto& n : st.members->nodes())
      if (n.state == cluster::node_state::alive)
        gpus.insert(gpus.end(), n.info.resources.gpus.begin(), n.info.resources.gpus.end());
    const auto choice = cluster::choose_device(gpus, "no alive node has a GPU");
    log::info("head: deployment '{}': device auto -> {} ({})", name, choice.device, choice.why);
    auto_device = choice.device;
  }
  // Everything the config and the model decide, once, before any rank is placed or loads.
  auto resolved = serve::resolve(std::move(dc), model, auto_device);
  if (!resolved) {
    log::warn("head: refused deployment '{}': {}", name, resolved.error().message());
    return done(std::move(resolved).error());
  }
  dc = resolved->config;
  std::vector<cluster::group_spec> groups;
  for (const auto& g : replica_groups(dc))
    groups.push_back({g.role,
                      {.tensor = g.parallel.tensor,
                       .pipeline = g.parallel.pipeline,
                       .replicas = g.parallel.replicas,
                       .expert = g.parallel.expert}});
  auto rec =
      st.deployments.add_groups(name, groups, model, st.members->nodes(), dc.device == "cpu");
  if (!rec) {
    log::warn("head: refused deployment '{}': {}", name, rec.error().message());
    return done(std::move(rec).error());
  }
  const std::string ns = (*rec)->ns;
  msg::deployment_plan plan{
      .resolved = std::make_shared<const serve::resolved_deployment>(std::move(*resolved)),
      .ns = ns,
      .replicas = {}};
  std::string where;
  for (const auto& rep : (*rec)->replicas)
    plan.replicas.push_back(plan_of(self, rep));
  for (const auto& r : (*rec)->ranks())
    where +=
        fmt::format(" r{}/pp{}/tp{}@{}:{}", r.replica, r.pp_rank, r.tp_rank, r.node_id, r.device);
  std::string layout;
  for (const auto& g : groups)
    layout += fmt::format(
        "{}{}tensor={} pipeline={} replicas={}{}", layout.empty() ? "" : ", ",
        g.role.empty() ? "" : g.role + " ", g.spec.tensor, g.spec.pipeline, g.spec.replicas,
        model.num_experts > 0
            ? fmt::format(" expert={}", g.spec.expert > 0 ? g.spec.expert : g.spec.tensor)
            : "");
  log::info("head: deploying '{}' ({}):{}", name, layout, where);
  if (client)
    st.load_clients[name] = client;
  auto serving = cfg.spawn_serving(self->system(), caf::actor_cast<caf::actor>(self));
  self->monitor(serving);
  st.serving[name] = serving;
  auto current = [self, name, ns]() -> cluster::deployment_record* {
    auto* r = self->state.deployments.find(name);
    return r && r->ns == ns ? r : nullptr;
  };
  self->request(serving, cfg.deploy_timeout, msg::deploy_atom::value, std::move(plan))
      .then(
          [self, name, done, current, dc, store = cfg.store](std::string& endpoint) mutable {
            self->state.load_clients.erase(name);
            auto* r = current();
            if (!r)
              return done(
                  make_error(errc::cancelled, "deployment '{}' was stopped while loading", name));
            if (r->state != "loading") { // a node died while loading
              auto err =
                  make_error(errc::unavailable, "deployment '{}' failed: {}", name, r->reason);
              remove_deployment(self, name);
              return done(std::move(err));
            }
            self->state.deployments.mark_ready(name);
            r->endpoint = endpoint;
            log::info("head: deployment '{}' is ready at {}", name, endpoint);
            // Recorded with the port it got, so that a restarted head serves it at the same one.
            if (auto colon = endpoint.rfind(':'); colon != std::string::npos)
              dc.port = std::atoi(endpoint.c_str() + colon + 1);
            if (auto saved = store.save(dc); !saved)
              log::warn("head: deployment '{}' is not recorded (a restarted head will not serve "
                        "it again): {}",
                        name, saved.error().message());
            done(view_of(*r, self->state.loads));
          },
          [self, name, done, current](caf::error& e) mutable {
            self->state.load_clients.erase(name);
            self->state.loads.forget(name);
            auto err = from_caf(e, &self->system());
            log::warn("head: deployment '{}' failed to start: {}", name, err.message());
            if (current())
              remove_deployment(self, name);
            done(std::move(err));
          });
}

void on_peeked(head* self, const head_config& cfg, uint64_t id, const detail::model_peek& peek) {
  auto& st = self->state;
  auto it = st.reads.find(id);
  if (it == st.reads.end())
    return; // it took too long and was given up
  auto read = std::move(it->second);
  st.reads.erase(it);
  if (!*peek.result)
    return read.done(troupe::error(peek.result->error())
                         .context("model " + read.config.model + " (read on the head)"));
  place(self, cfg, std::move(read.config), **peek.result, std::move(read.done), read.client);
}

caf::result<msg::deployment_view> on_deploy(head* self, const head_config& cfg,
                                            deployment_config& dc) {
  if (self->state.restore.count(dc.served_model_name))
    return refuse(make_error(errc::invalid_argument,
                             "a deployment named '{}' is being restored from the previous head "
                             "(cluster serve --stop {} first)",
                             dc.served_model_name, dc.served_model_name));
  // Before the promise, which takes the sender over from the current message.
  auto client = caf::actor_cast<caf::actor>(self->current_sender());
  auto rp = self->make_response_promise<msg::deployment_view>();
  start_deployment(
      self, cfg, std::move(dc),
      [rp](expected<msg::deployment_view> v) mutable {
        if (v)
          rp.deliver(std::move(*v));
        else
          rp.deliver(refuse(v.error()));
      },
      std::move(client));
  return rp;
}

// Serves a crashed head's deployments again, each once its devices are back: placement that
// finds too few devices (nodes still rejoining) or a failed load is tried again every second;
// any other refusal drops the record, saying why.
void restore_due(head* self, const head_config& cfg) {
  for (auto& [name, r] : self->state.restore) {
    if (r.attempting || self->state.deployments.find(name))
      continue;
    r.attempting = true;
    start_deployment(self, cfg, r.config,
                     [self, name = name, store = cfg.store](expected<msg::deployment_view> v) {
                       auto& restore = self->state.restore;
                       auto it = restore.find(name);
                       if (it == restore.end())
                         return; // stopped meanwhile
                       if (v) {
                         log::info("head: deployment '{}' restored at {}", name, v->endpoint);
                         restore.erase(it);
                         return;
                       }
                       const auto code = v.error().code();
                       if (code == errc::resource_exhausted || code == errc::unavailable ||
                           code == errc::timeout) {
                         if (it->second.reason != v.error().message())
                           log::warn("head: deployment '{}' not restored yet: {}", name,
                                     v.error().message());
                         it->second.reason = v.error().message();
                         it->second.attempting = false;
                         return;
                       }
                       log::error("head: cannot restore deployment '{}': {}; its record is removed",
                                  name, v.error().message());
                       store.remove(name);
                       restore.erase(it);
                     });
  }
}

caf::result<bool> on_undeploy(head* self, const head_config& cfg, const std::string& name) {
  auto& st = self->state;
  const bool restoring = st.restore.erase(name) > 0;
  if (!st.deployments.find(name) && !restoring)
    return refuse(make_error(errc::not_found, "no deployment named '{}'", name));
  cfg.store.remove(name);
  if (st.deployments.find(name))
    remove_deployment(self, name);
  log::info("head: deployment '{}' stopped; its devices are free", name);
  return true;
}

// The serving actor exited (or reports a state of the whole deployment).
void on_state_report(head* self, const std::string& name, const std::string& state,
                     const std::string& reason) {
  auto* rec = self->state.deployments.find(name);
  if (!rec || rec->state == "failed")
    return;
  rec->state = state;
  rec->reason = reason;
  log::warn("head: deployment '{}' is {}: {}", name, state, reason);
}

// A clean stop: every deployment drains (no new requests; those in flight get up to `grace_s`
// to finish, the rest end with an error), then the serving actors exit and the nodes are told
// to shut down. Answers once all of that is done.
caf::result<bool> on_stop(head* self, const head_config& cfg, double grace_s) {
  auto& st = self->state;
  st.stopping = true;
  cfg.store.clear(); // a clean stop: the next head starts without deployments
  auto rp = self->make_response_promise<bool>();
  auto finish = [self, rp]() mutable {
    auto& st = self->state;
    for (auto& [name, serving] : st.serving) {
      self->demonitor(serving);
      self->send_exit(serving, caf::exit_reason::user_shutdown);
    }
    st.serving.clear();
    for (auto& [id, link] : st.links)
      if (link.actor)
        self->send(link.actor, msg::shutdown_atom::value);
    log::info("head: stopping; told {} node(s)", st.links.size());
    rp.deliver(true);
  };
  if (st.serving.empty()) {
    finish();
    return rp;
  }
  log::info("head: stopping; {} deployment(s) get up to {:.0f} s to finish their requests",
            st.serving.size(), grace_s);
  auto left = std::make_shared<size_t>(st.serving.size());
  const auto wait =
      std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)) + std::chrono::seconds(5);
  for (auto& [name, serving] : st.serving)
    self->request(serving, wait, msg::stop_atom::value, grace_s)
        .then([left, finish](bool) mutable { --*left == 0 ? finish() : void(); },
              [left, finish](caf::error&) mutable { --*left == 0 ? finish() : void(); });
  return rp;
}

} // namespace

caf::behavior head_actor(caf::stateful_actor<head_state, guarded_actor>* self, head_config cfg) {
  self->state.members.emplace(cfg.token, cfg.version, cfg.membership);
  for (auto& dc : cfg.recovered)
    self->state.restore[dc.served_model_name].config = dc;
  cfg.recovered.clear();
  // Give the nodes a few heartbeats to rejoin, so restored replicas land where they were.
  self->state.next_restore = cluster::clock::now() + 3 * cfg.heartbeat;
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
        if (!from_node(self, id)) {
          drop(self, "heartbeat for node " + id + " (not from that node)");
          return false;
        }
        return self->state.members->heartbeat(id, key, cluster::clock::now()) ==
               cluster::heartbeat_result::ok;
      },
      [self](msg::leave_atom, const std::string& id, uint64_t key) {
        if (!from_node(self, id)) {
          drop(self, "leave for node " + id + " (not from that node)");
          return false;
        }
        bool left = self->state.members->leave(id, key);
        if (left) {
          log::info("head: node {} left the cluster", id);
          fail_node_deployments(self, id, "it left the cluster (cluster stop)"); // workers too
        }
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
      [self, cfg, authorized](msg::stop_atom, const std::string& token,
                              double grace_s) -> caf::result<bool> {
        if (from_remote_node_process(self))
          return refuse_role(self, "stop (from a node's process)");
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        return on_stop(self, cfg, grace_s);
      },
      [self, cfg, authorized](msg::deploy_atom, const std::string& token,
                              deployment_config& dc) -> caf::result<msg::deployment_view> {
        if (from_remote_node_process(self))
          return refuse_role(self, "deploy (from a node's process)");
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        return on_deploy(self, cfg, dc);
      },
      [self, cfg, authorized](msg::undeploy_atom, const std::string& token,
                              const std::string& name) -> caf::result<bool> {
        if (from_remote_node_process(self))
          return refuse_role(self, "undeploy (from a node's process)");
        if (auto ok = authorized(token); !ok)
          return refuse(ok.error());
        return on_undeploy(self, cfg, name);
      },
      [self](msg::ready_atom, const std::string& name, const std::string& state,
             const std::string& reason) {
        if (!from_serving(self, name))
          return drop(self, "ready for deployment '" + name + "' (not from its serving actor)");
        on_state_report(self, name, state, reason);
      },
      [self](msg::failed_atom, const std::string& name, const std::string& ns,
             const std::string& why) {
        if (!from_serving(self, name))
          return drop(self, "failed for deployment '" + name + "' (not from its serving actor)");
        on_replica_failed(self, name, ns, why);
      },
      [self, cfg](msg::restart_atom) {
        if (!from_self(self))
          return drop(self, "restart (only the head sends it to itself)");
        restart_due(self, cfg);
        restore_due(self, cfg);
      },
      [self, cfg](peeked_atom, uint64_t id, const detail::model_peek& peek) {
        if (self->current_sender()) // anonymous: the head's own reader threads
          return drop(self, "peeked (only the head's reader threads send it)");
        on_peeked(self, cfg, id, peek);
      },
      [self](msg::progress_atom, msg::rank_progress& p) {
        if (!from_serving(self, p.deployment))
          return drop(self, "progress for deployment '" + p.deployment +
                                "' (not from its serving actor)");
        self->state.loads.update(p);
        if (auto it = self->state.load_clients.find(p.deployment);
            it != self->state.load_clients.end())
          self->send(it->second, msg::progress_atom::value, std::move(p));
      },
      [self](msg::linked_atom, const std::string& name, const std::string& transfer) {
        if (!from_serving(self, name))
          return drop(self, "linked for deployment '" + name + "' (not from its serving actor)");
        if (auto* rec = self->state.deployments.find(name))
          rec->transfer = transfer;
      },
      [self, cfg](msg::tick_atom) {
        if (!from_self(self))
          return drop(self, "tick (only the head sends it to itself)");
        on_tick(self, cfg);
      },
  };
}

} // namespace troupe::actors
