#include "actors/serving/serving_actor.hpp"

#include <algorithm>
#include <functional>
#include <optional>
#include <set>

#include <caf/after.hpp>
#include <caf/blocking_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/serving/kv_net.hpp"
#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

using serving = caf::stateful_actor<serving_state>;
using namespace std::chrono_literals;
constexpr auto load_timeout = 300s;

void stop_workers(const std::vector<caf::actor>& workers) {
  for (const auto& w : workers)
    caf::anon_send_exit(w, caf::exit_reason::user_shutdown);
}

// Asks each rank's node to spawn its worker, owned by `owner` (the serving actor: the workers
// exit when it does). Blocks. `workers` holds those spawned, also on error.
expected<void> spawn_workers(caf::blocking_actor* self, const caf::actor& owner,
                             const deployment_config& c, const replica_group& g, const kv_plan& kv,
                             const msg::replica_plan& plan, bool kv_cuda_ipc,
                             std::vector<caf::actor>& workers) {
  for (size_t i = 0; i < plan.ranks.size(); ++i) {
    const auto& r = plan.ranks[i];
    if (i >= plan.nodes.size() || !plan.nodes[i])
      return make_error(errc::unavailable, "node {} of rank {} is not connected to the head",
                        r.node_id, i);
    msg::worker_spec spec{.deployment = c.served_model_name,
                          .ns = plan.ns,
                          .model = c.model,
                          .tp_rank = r.tp_rank,
                          .tp_size = g.parallel.tensor,
                          .pp_rank = r.pp_rank,
                          .pp_size = g.parallel.pipeline,
                          .ep_size = g.parallel.expert,
                          .device = r.device,
                          // cuda: 0 lets each GPU size its pool from gpu_memory_utilization
                          .num_blocks = c.device == "cuda" ? c.num_kv_blocks : kv.num_blocks,
                          .block_size = g.block_size,
                          .backend = c.device,
                          .max_model_len = kv.max_model_len,
                          .max_num_seqs = c.max_num_seqs,
                          .max_num_batched_tokens = c.max_num_batched_tokens,
                          .gpu_memory_utilization = static_cast<float>(c.gpu_memory_utilization),
                          .kv_role = g.role,
                          .kv_provider = c.disaggregation.provider,
                          .kv_staging = c.disaggregation.staging,
                          .kv_staging_tokens = c.disaggregation.staging_tokens,
                          .kv_cuda_ipc = kv_cuda_ipc};
    troupe::error err;
    self->request(plan.nodes[i], 10s, msg::spawn_atom::value, std::move(spec), owner)
        .receive([&](caf::actor& w) { workers.push_back(std::move(w)); },
                 [&](caf::error& e) { err = actors::from_caf(e, &self->system()); });
    if (err)
      return std::move(err).context(
          fmt::format("spawning replica {} rank {} on node {}", plan.replica, i, r.node_id));
  }
  return {};
}

// Has every worker load its shard; fails on the first error or a worker that dies. Blocks.
// Returns the smallest KV pool among the ranks (the pool the replica's scheduler may use).
// errc::cancelled when `owner` went away meanwhile. The ranks' load progress goes to `progress`.
expected<int32_t> load_workers(caf::blocking_actor* self, const caf::actor& owner,
                               const std::vector<caf::actor>& workers,
                               const msg::replica_plan& plan, std::vector<msg::kv_rank>& kv,
                               const std::function<void(msg::rank_progress&)>& progress) {
  kv.assign(workers.size(), {});
  for (const auto& w : workers) {
    self->monitor(w);
    self->send(w, msg::load_atom::value);
  }
  size_t loaded = 0;
  int32_t blocks = 0;
  troupe::error err;
  const auto deadline = std::chrono::steady_clock::now() + load_timeout;
  while (loaded < workers.size() && !err) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    self->receive(
        [&](msg::worker_reply& r) {
          const auto rank = static_cast<size_t>(r.rank);
          if (!r.error.empty())
            err = make_error(errc::unavailable, "replica {} rank {} on node {} failed to load: {}",
                             plan.replica, r.rank,
                             rank < plan.ranks.size() ? plan.ranks[rank].node_id : "?", r.error);
          else
            blocks = loaded++ == 0 ? r.kv_blocks : std::min(blocks, r.kv_blocks);
          if (r.error.empty() && rank < kv.size())
            kv[rank] = std::move(r.kv);
        },
        [&](msg::progress_atom, msg::rank_progress& p) {
          const auto rank = static_cast<size_t>(p.rank);
          if (rank < workers.size() &&
              caf::actor_cast<caf::actor_addr>(self->current_sender()) == workers[rank].address())
            progress(p);
        },
        [&](caf::down_msg& dm) {
          if (dm.source == owner.address())
            err = make_error(errc::cancelled, "the deployment was stopped");
          else
            err = make_error(errc::unavailable, "a worker of replica {} died while loading ({})",
                             plan.replica, self->system().render(dm.reason));
        },
        caf::after(std::max(left, std::chrono::milliseconds(1))) >>
            [&] {
              err = make_error(errc::timeout, "replica {}: ranks did not load within {} s",
                               plan.replica, load_timeout.count());
            });
  }
  if (err)
    return err;
  return blocks;
}

// One replica's loader (a detached blocking actor): spawns and loads its workers, then tells
// the serving actor (loaded_atom), which owns them from then on. Exits quietly, stopping what
// it spawned, when the serving actor goes away. Its ranks' load progress goes to the head as
// the serving actor's (the head passes it to the `cluster serve` client waiting), named by the
// replica's index within its group (`first`: the group's first replica) and each rank's node.
void replica_loader(caf::blocking_actor* self, caf::actor owner, caf::actor head,
                    deployment_config c, replica_group g, int32_t first, kv_plan kv,
                    msg::replica_plan plan, bool kv_cuda_ipc) {
  self->monitor(owner);
  msg::replica_loaded out{.replica = plan.replica, .ns = plan.ns};
  std::vector<caf::actor> workers;
  auto progress = [&](msg::rank_progress& p) {
    p.deployment = c.served_model_name;
    p.role = g.role;
    p.replica = plan.replica - first;
    p.node_id = static_cast<size_t>(p.rank) < plan.ranks.size()
                    ? plan.ranks[static_cast<size_t>(p.rank)].node_id
                    : "";
    if (head)
      caf::send_as(owner, head, msg::progress_atom::value, std::move(p));
  };
  auto ok = spawn_workers(self, owner, c, g, kv, plan, kv_cuda_ipc, workers);
  expected<int32_t> blocks = ok ? load_workers(self, owner, workers, plan, out.kv, progress)
                                : expected<int32_t>(std::move(ok).error());
  if (!blocks) {
    stop_workers(workers);
    if (blocks.error().code() == errc::cancelled)
      return;
    out.error = blocks.error().message();
  } else {
    out.workers = std::move(workers);
    out.kv_blocks = *blocks;
  }
  self->send(owner, msg::loaded_atom::value, std::move(out));
}

bool is_prefill(const serving_state& st, int32_t replica) {
  return st.groups[group_index(st.groups, replica)].role == "prefill";
}

void start_loader(serving* self, const msg::replica_plan& plan) {
  const auto g = group_index(self->state.groups, plan.replica);
  int32_t first = 0;
  for (size_t k = 0; k < g; ++k)
    first += self->state.groups[k].parallel.replicas;
  self->spawn<caf::detached>(replica_loader, caf::actor_cast<caf::actor>(self), self->state.head,
                             self->state.config, self->state.groups[g], first,
                             self->state.group_kv[g], plan, !self->state.kv_ipc_host.empty());
}

// A loaded replica's workers, driven by its replica actor. Their failure marks the replica
// failed in the router (health) and tells the head, which drops and restarts it.
expected<replica_executor> executor_of(serving* self, const caf::actor& head,
                                       msg::replica_loaded& r) {
  const auto& c = self->state.config;
  const auto gi = group_index(self->state.groups, r.replica);
  const auto& g = self->state.groups[gi];
  const auto& kv = self->state.group_kv[gi];
  const int32_t per_seq = (kv.max_model_len + g.block_size - 1) / g.block_size;
  if (r.kv_blocks < per_seq)
    return make_error(errc::resource_exhausted,
                      "replica {}: the smallest rank's KV pool has {} blocks of {} tokens, fewer "
                      "than one context of max_model_len {} needs ({}); raise "
                      "gpu_memory_utilization or lower max_model_len",
                      r.replica, r.kv_blocks, g.block_size, kv.max_model_len, per_seq);
  auto health = std::make_shared<replica_health>();
  // Sent as the serving actor: the head accepts `failed` only from a deployment's own serving
  // actor (weak: the executor lives in this actor's state).
  auto on_failure = [head, me = caf::actor_cast<caf::weak_actor_ptr>(self),
                     name = c.served_model_name, ns = r.ns](const std::string& why) {
    if (auto strong = me.lock())
      caf::send_as(caf::actor_cast<caf::actor>(strong), head, msg::failed_atom::value, name, ns,
                   why);
  };
  // The last stage's tensor rank 0 answers (it samples). One plan per stage in flight, and two
  // at pipeline 1, so the ranks never wait for scheduling. A plan may wait behind the others in
  // flight, and passes every stage, each of which may wait up to stage_wait_ms for the one
  // before it.
  const int32_t depth = std::max(g.parallel.pipeline, 2);
  const size_t answer = static_cast<size_t>(g.parallel.pipeline - 1) * g.parallel.tensor;
  const auto step_timeout = msg::worker_spec::stage_wait_ms * 1ms * depth + 5s;
  return replica_executor{.exec = nullptr,
                          .num_blocks = r.kv_blocks,
                          .health = health,
                          .ranks = {.workers = r.workers,
                                    .answer_rank = answer,
                                    .timeout = step_timeout,
                                    .stages = g.parallel.pipeline,
                                    .on_failure = std::move(on_failure)},
                          .block_size = g.block_size};
}

// Watches a loaded replica's workers: one going down fails the replica even while it is idle.
void watch(serving* self, const msg::replica_loaded& r) {
  const auto& nodes = self->state.rank_nodes.at(static_cast<size_t>(r.replica));
  for (size_t k = 0; k < r.workers.size(); ++k) {
    self->monitor(r.workers[k]);
    self->state.watched[r.workers[k].address()] = {r.replica, r.ns, k,
                                                   k < nodes.size() ? nodes[k] : "?"};
  }
}

void on_worker_down(serving* self, const caf::actor& head, const caf::down_msg& dm) {
  auto& st = self->state;
  auto it = st.watched.find(dm.source);
  if (it == st.watched.end())
    return;
  const auto w = it->second;
  st.watched.erase(it);
  const auto i = static_cast<size_t>(w.replica);
  if (i >= st.ns.size() || st.ns[i] != w.ns)
    return; // a dropped attempt's worker exiting
  const auto why = fmt::format("deployment worker failure: rank {} on node {} is gone ({})", w.rank,
                               w.node_id, self->system().render(dm.reason));
  log::warn("serving: '{}' replica {}: {}", st.config.served_model_name, w.replica, why);
  if (i < st.health.size() && st.health[i])
    st.health[i]->fail(why);
  self->send(head, msg::failed_atom::value, st.config.served_model_name, w.ns, why);
}

// ---- Disaggregated deployments ----

// The layout contract between prefill replica `p` and decode replica `d`, from their ranks'.
expected<cluster::transfer::kv_handoff_plan> contract(const serving_state& st, size_t p, size_t d) {
  std::vector<engine::kv_layout> pl, dl;
  for (const auto& r : st.kv_ranks[p])
    pl.push_back(r.layout);
  for (const auto& r : st.kv_ranks[d])
    dl.push_back(r.layout);
  return cluster::transfer::kv_handoff_plan::make(std::move(pl), std::move(dl));
}

// Has prefill replica `p`'s ranks (`workers`) connect to decode replica `d`'s. Blocks while they
// connect (the decode ranks accept on their own threads).
expected<void> link(serving* self, size_t p, const std::vector<caf::actor>& workers, size_t d) {
  auto& st = self->state;
  const msg::kv_link l{
      .decode = static_cast<uint32_t>(d), .prefill = st.kv_ranks[p], .ranks = st.kv_ranks[d]};
  caf::scoped_actor blocking{self->system()};
  for (size_t k = 0; k < workers.size(); ++k) {
    troupe::error err;
    blocking->request(workers[k], 30s, msg::link_atom::value, l)
        .receive(
            [&](std::string& e) {
              if (!e.empty())
                err = make_error(errc::unavailable, "{}", e);
            },
            [&](caf::error& e) { err = actors::from_caf(e, &self->system()); });
    if (err)
      return std::move(err).context(
          fmt::format("linking replica {} rank {} to decode replica {}", p, k, d));
  }
  return {};
}

// Replica `replica`'s part in the handoffs under `plan` (every replica of a group has the same
// layout, so one contract serves them all).
void add_role(serving_state& st, int32_t replica, const cluster::transfer::kv_handoff_plan& plan,
              replica_executor& ex) {
  if (is_prefill(st, replica)) {
    auto role = std::make_shared<prefill_role>();
    std::set<size_t> ranks;
    for (const auto& [p, d] : plan.pairs())
      ranks.insert(p);
    role->pushers.assign(ranks.begin(), ranks.end());
    role->stats = st.handoffs;
    ex.prefill = std::move(role);
  } else {
    ex.decode = make_decode_role(st.config.disaggregation, static_cast<uint32_t>(replica),
                                 static_cast<uint32_t>(plan.pairs().size()), st.handoffs);
    // Staged ranks publish their landing areas (all of one size: one configuration).
    for (const auto& r : st.kv_ranks[static_cast<size_t>(replica)])
      ex.decode->landing_blocks = ex.decode->landing_blocks == 0
                                      ? r.landing_blocks
                                      : std::min(ex.decode->landing_blocks, r.landing_blocks);
  }
}

// Links every prefill replica to every decode replica of the first load and gives each
// executor its role. Reports the provider and the contract to the head.
expected<void> link_all(serving* self, const caf::actor& head,
                        std::vector<msg::replica_loaded>& loaded,
                        std::vector<replica_executor>& executors) {
  auto& st = self->state;
  const size_t decoding = static_cast<size_t>(st.groups.front().parallel.replicas);
  for (auto& l : loaded)
    st.kv_ranks[static_cast<size_t>(l.replica)] = l.kv;
  auto plan = contract(st, decoding, 0);
  if (!plan)
    return std::move(plan).error().context("prefill and decode groups");
  auto at = cluster::transfer::endpoint_address::parse(st.kv_ranks[0].front().endpoint);
  if (!at)
    return std::move(at).error();
  st.handoffs->provider = at->transport;
  for (size_t p = decoding; p < loaded.size(); ++p)
    for (size_t d = 0; d < decoding; ++d)
      TROUPE_TRY_VOID(link(self, p, loaded[p].workers, d));
  for (size_t i = 0; i < executors.size(); ++i)
    add_role(st, static_cast<int32_t>(i), *plan, executors[i]);
  const int32_t landing = st.kv_ranks[0].front().landing_blocks;
  std::string how; // GPU KV: by CUDA IPC (same host), staged, or straight from the GPU
  if (landing > 0)
    how =
        fmt::format("; KV staged through host memory ({} landing blocks per decode rank)", landing);
  else if (!st.kv_ipc_host.empty())
    how = "; KV by CUDA IPC (same host)";
  const auto text = fmt::format("provider {}: {}{}", at->transport, plan->describe(), how);
  log::info("serving: '{}': {} prefill -> {} decode replica(s) linked, {}",
            st.config.served_model_name, loaded.size() - decoding, decoding, text);
  self->send(head, msg::linked_atom::value, st.config.served_model_name, text);
  return {};
}

// A restarted replica of a disaggregated deployment: linked to the other group's serving
// replicas (a prefill replica to every decode replica; every prefill replica to a decode one),
// with its role.
expected<void> relink(serving* self, msg::replica_loaded& r, replica_executor& ex) {
  auto& st = self->state;
  const auto i = static_cast<size_t>(r.replica);
  const size_t decoding = static_cast<size_t>(st.groups.front().parallel.replicas);
  st.kv_ranks[i] = r.kv;
  std::optional<cluster::transfer::kv_handoff_plan> plan;
  const bool decode = i < decoding;
  const size_t others_begin = decode ? decoding : 0, others_end = decode ? st.ns.size() : decoding;
  for (size_t k = others_begin; k < others_end; ++k) {
    const size_t p = decode ? k : i, d = decode ? i : k;
    if (st.kv_ranks[k].empty())
      continue;
    auto c = contract(st, p, d);
    if (!c)
      return std::move(c).error().context("prefill and decode groups");
    if (!plan)
      plan = *c;
    if (st.ns[k].empty() || st.workers[k].empty())
      continue; // not serving: linked when it serves again
    if (auto ok = link(self, p, decode ? st.workers[k] : r.workers, d); !ok) {
      if (!decode)
        return ok; // the restarted prefill replica cannot reach a serving decode replica
      // That prefill replica's handoffs to this one fail and fall back as configured.
      log::warn("serving: '{}': {}", st.config.served_model_name, ok.error().message());
    }
  }
  if (!plan)
    return make_error(errc::unavailable, "no layout of the other group is known");
  add_role(st, r.replica, *plan, ex);
  return {};
}

// Every replica of the first load has reported: start the deployment (or fail it).
void finish_first_load(serving* self, const caf::actor& head, const std::string& version) {
  auto& st = self->state;
  auto loaded = std::move(st.first_loaded);
  std::sort(loaded.begin(), loaded.end(),
            [](const auto& a, const auto& b) { return a.replica < b.replica; });
  auto fail = [&](const troupe::error& err) {
    log::error("serving: '{}' failed to start: {}", st.config.served_model_name, err.message());
    for (auto& l : loaded)
      stop_workers(l.workers);
    st.first.deliver(actors::to_caf(err));
  };
  for (const auto& l : loaded)
    if (!l.error.empty())
      return fail(make_error(errc::unavailable, "{}", l.error));
  std::vector<replica_executor> executors;
  st.health.assign(st.ns.size(), nullptr);
  for (auto& l : loaded) {
    auto ex = executor_of(self, head, l);
    if (!ex)
      return fail(ex.error());
    st.health[static_cast<size_t>(l.replica)] = ex->health;
    executors.push_back(std::move(*ex));
  }
  if (st.config.disaggregation.enabled)
    if (auto ok = link_all(self, head, loaded, executors); !ok)
      return fail(ok.error());
  auto d =
      deployment::start(*st.resolved, version, self->system(),
                        [&](const resolved_deployment&) -> expected<std::vector<replica_executor>> {
                          return std::move(executors);
                        });
  if (!d)
    return fail(d.error());
  st.served = std::move(*d);
  for (auto& l : loaded) {
    watch(self, l);
    st.workers[static_cast<size_t>(l.replica)] = std::move(l.workers);
  }
  const auto endpoint = fmt::format("http://{}:{}/v1", st.served->host(), st.served->port());
  log::info("serving: '{}' at {}", st.config.served_model_name, endpoint);
  st.first.deliver(endpoint);
}

// A restarted replica has loaded (or failed to): swap its executor in and answer the head.
void finish_restart(serving* self, const caf::actor& head, msg::replica_loaded& r) {
  auto& st = self->state;
  auto it = st.restarting.find(r.replica);
  auto rp = it->second;
  st.restarting.erase(it);
  const auto i = static_cast<size_t>(r.replica);
  auto fail = [&](const troupe::error& err) {
    stop_workers(r.workers);
    st.ns[i].clear();
    log::warn("serving: '{}' replica {} failed to restart: {}", st.config.served_model_name,
              r.replica, err.message());
    rp.deliver(actors::to_caf(err));
  };
  if (!r.error.empty())
    return fail(make_error(errc::unavailable, "{}", r.error));
  auto ex = executor_of(self, head, r);
  if (!ex)
    return fail(ex.error());
  if (st.config.disaggregation.enabled)
    if (auto ok = relink(self, r, *ex); !ok)
      return fail(ok.error());
  auto health = ex->health;
  if (auto ok = st.served->replace(i, std::move(*ex)); !ok)
    return fail(ok.error());
  st.health[i] = std::move(health);
  watch(self, r);
  stop_workers(st.workers[i]); // normally stopped by the drop already
  st.workers[i] = std::move(r.workers);
  log::info("serving: '{}' replica {} serves again ({})", st.config.served_model_name, r.replica,
            r.ns);
  rp.deliver(r.ns);
}

caf::result<std::string> on_deploy(serving* self, const msg::deployment_plan& plan) {
  auto& st = self->state;
  if (!plan.resolved)
    return actors::to_caf(make_error(errc::internal, "a deployment plan without its resolution"));
  st.resolved = plan.resolved;
  st.config = plan.resolved->config;
  st.groups.clear();
  st.group_kv.clear();
  for (const auto& g : plan.resolved->groups) {
    st.groups.push_back(g.group);
    st.group_kv.push_back(g.kv);
  }
  st.handoffs = std::make_shared<handoff_stats>();
  const size_t n = plan.replicas.size();
  st.kv_ranks.assign(n, {});
  st.ns.assign(n, {});
  st.workers.assign(n, {});
  st.rank_nodes.assign(n, {});
  log::info("serving: starting '{}': {} replica(s) of {} rank(s)", st.config.served_model_name, n,
            n ? plan.replicas.front().ranks.size() : 0);
  std::vector<std::string> hosts; // of every rank of every group
  for (const auto& r : plan.replicas) {
    if (r.replica < 0 || static_cast<size_t>(r.replica) >= n)
      return actors::to_caf(make_error(errc::internal, "replica {} of {}", r.replica, n));
    st.ns[static_cast<size_t>(r.replica)] = r.ns;
    for (size_t k = 0; k < r.ranks.size(); ++k) {
      st.rank_nodes[static_cast<size_t>(r.replica)].push_back(r.ranks[k].node_id);
      hosts.push_back(k < r.hosts.size() ? r.hosts[k] : std::string());
    }
  }
  st.kv_ipc_host = kv_cuda_ipc_host(st.config, hosts);
  if (!st.kv_ipc_host.empty())
    log::info("serving: '{}': every rank runs on host {}: GPU KV goes by CUDA IPC",
              st.config.served_model_name, st.kv_ipc_host);
  for (const auto& r : plan.replicas)
    start_loader(self, r);
  st.first = self->make_response_promise<std::string>();
  return st.first;
}

// The head dropped a failed replica: no more requests go there, its workers are stopped.
void on_drop(serving* self, int32_t replica, const std::string& ns, const std::string& why) {
  auto& st = self->state;
  const auto i = static_cast<size_t>(replica);
  if (replica < 0 || i >= st.ns.size() || st.ns[i] != ns)
    return; // an older attempt
  st.ns[i].clear();
  if (auto it = st.restarting.find(replica); it != st.restarting.end()) {
    it->second.deliver(actors::to_caf(make_error(errc::unavailable, "{}", why)));
    st.restarting.erase(it);
  }
  log::warn("serving: '{}' drops replica {}: {}", st.config.served_model_name, replica, why);
  if (st.served)
    st.served->take_down(i, why);
  stop_workers(st.workers[i]);
  st.workers[i].clear();
}

caf::result<std::string> on_restart(serving* self, const msg::replica_plan& plan) {
  auto& st = self->state;
  const auto i = static_cast<size_t>(plan.replica);
  if (!st.served || plan.replica < 0 || i >= st.ns.size())
    return actors::to_caf(
        make_error(errc::invalid_argument, "no replica {} being served", plan.replica));
  if (!st.kv_ipc_host.empty()) // the KV path was decided when the deployment loaded
    for (size_t k = 0; k < plan.ranks.size(); ++k)
      if (k >= plan.hosts.size() || plan.hosts[k] != st.kv_ipc_host)
        return actors::to_caf(make_error(
            errc::unavailable,
            "replica {} rank {} was placed on node {} ({}), off host {} where this deployment's "
            "KV goes by CUDA IPC",
            plan.replica, k, plan.ranks[k].node_id,
            k < plan.hosts.size() && !plan.hosts[k].empty() ? plan.hosts[k] : "unknown host",
            st.kv_ipc_host));
  if (auto it = st.restarting.find(plan.replica); it != st.restarting.end()) {
    it->second.deliver(
        actors::to_caf(make_error(errc::cancelled, "superseded by the restart under {}", plan.ns)));
    st.restarting.erase(it);
  }
  if (!st.ns[i].empty()) // still serving an attempt the head gave up on
    on_drop(self, plan.replica, st.ns[i], "replaced by a restart");
  st.ns[i] = plan.ns;
  st.rank_nodes[i].clear();
  for (const auto& rank : plan.ranks)
    st.rank_nodes[i].push_back(rank.node_id);
  log::info("serving: '{}' restarting replica {} on {} rank(s) ({})", st.config.served_model_name,
            plan.replica, plan.ranks.size(), plan.ns);
  start_loader(self, plan);
  auto rp = self->make_response_promise<std::string>();
  st.restarting.emplace(plan.replica, rp);
  return rp;
}

void on_loaded(serving* self, const caf::actor& head, const std::string& version,
               msg::replica_loaded& r) {
  auto& st = self->state;
  const auto i = static_cast<size_t>(r.replica);
  if (r.replica < 0 || i >= st.ns.size() || st.ns[i] != r.ns) {
    stop_workers(r.workers); // a dropped or superseded attempt
    return;
  }
  if (!st.served) {
    st.first_loaded.push_back(std::move(r));
    if (st.first_loaded.size() == st.ns.size())
      finish_first_load(self, head, version);
    return;
  }
  if (st.restarting.count(r.replica))
    finish_restart(self, head, r);
  else
    stop_workers(r.workers);
}

} // namespace

serving_state::~serving_state() {
  served.reset(); // HTTP server and engines first: in-flight requests end before the workers go
  for (auto& ws : workers)
    stop_workers(ws);
  for (auto& l : first_loaded)
    stop_workers(l.workers);
}

caf::behavior serving_actor(caf::stateful_actor<serving_state>* self, caf::actor head,
                            std::string version) {
  self->state.head = head;
  self->set_down_handler([self, head](caf::down_msg& dm) { on_worker_down(self, head, dm); });
  return {
      [self](msg::deploy_atom, const msg::deployment_plan& plan) -> caf::result<std::string> {
        return on_deploy(self, plan);
      },
      [self, head, version](msg::loaded_atom, msg::replica_loaded& r) {
        on_loaded(self, head, version, r);
      },
      [self](msg::drop_atom, int32_t replica, const std::string& ns, const std::string& why) {
        on_drop(self, replica, ns, why);
      },
      [self](msg::restart_atom, const msg::replica_plan& plan) -> caf::result<std::string> {
        return on_restart(self, plan);
      },
      // The head stops cleanly: no new requests; those in flight get up to grace_s to finish,
      // the rest end with an error. Blocks this (detached) actor meanwhile.
      [self](msg::stop_atom, double grace_s) {
        const auto& sender = self->current_sender();
        if (sender && sender->node() != self->node())
          return false; // only the head, in this process, stops a deployment
        if (self->state.served)
          self->state.served->drain(grace_s);
        return true;
      },
  };
}

} // namespace troupe::serve
