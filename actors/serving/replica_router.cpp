#include "actors/serving/replica_router.hpp"

#include <algorithm>

#include <caf/send.hpp>
#include <fmt/format.h>

namespace troupe::serve {

namespace {
// A replica holding a prompt's prefix takes it while it has at most this many more unfinished
// requests than the least loaded one (SGLang's cache-aware router balances the same way).
constexpr size_t affinity_slack = 4;
} // namespace

replica_router::unit::~unit() {
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
}

replica_router::replica_router(caf::actor_system& sys, std::string deployment, size_t replicas,
                               engine::scheduler_options options)
  : sys_(sys), deployment_(std::move(deployment)), options_(std::move(options)), slots_(replicas),
    affinity_(options_.block_size), prefill_affinity_(options_.block_size) {
  for (size_t i = 0; i < replicas; ++i)
    slots_[i].down = fmt::format("replica {} is loading", i);
}

replica_router::~replica_router() {
  std::lock_guard lk(mu_);
  slots_.clear(); // each replica actor is told to stop
  prefill_slots_.clear();
}

bool replica_router::serving(const slot& s) const {
  return s.u && !s.u->health->failed();
}

void replica_router::prune() {
  for (auto it = live_.begin(); it != live_.end();)
    it = it->second.sink.expired() || it->second.owner.expired() ? live_.erase(it) : ++it;
}

size_t replica_router::load(size_t i) const {
  size_t n = 0;
  for (const auto& [id, l] : live_)
    n += l.slot == i;
  return n;
}

std::shared_ptr<replica_router::unit> replica_router::make_unit(replica_executor r,
                                                                engine::scheduler_options options,
                                                                expected<void>& ok) {
  replica_spec spec{.options = std::move(options),
                    .exec = std::move(r.exec),
                    .ranks = std::move(r.ranks),
                    .health = r.health ? r.health : std::make_shared<replica_health>(),
                    .gauges = std::make_shared<replica_gauges>(),
                    .prefill = std::move(r.prefill),
                    .decode = std::move(r.decode)};
  spec.options.num_blocks = r.num_blocks;
  if (r.block_size > 0)
    spec.options.block_size = r.block_size;
  ok = engine::validate(spec.options);
  if (!ok)
    return nullptr;
  auto u = std::make_shared<unit>();
  u->health = spec.health;
  u->gauges = spec.gauges;
  u->actor = spawn_replica(sys_, std::move(spec));
  return u;
}

expected<void> replica_router::install(size_t i, replica_executor r) {
  if (i >= slots_.size())
    return make_error(errc::invalid_argument, "replica {} of {}", i, slots_.size());
  expected<void> ok;
  auto u = make_unit(std::move(r), options_, ok);
  if (!u)
    return ok;
  std::lock_guard lk(mu_);
  std::swap(slots_[i].u, u);
  slots_[i].down.clear();
  affinity_.forget(i); // a new replica: its prefix cache is empty
  return {};           // `u`, the previous replica, stops here
}

expected<void> replica_router::install_prefill(size_t i, replica_executor r) {
  if (!r.prefill)
    return make_error(errc::invalid_argument, "prefill replica {} has no prefill role", i);
  auto stats = r.prefill->stats;
  expected<void> ok;
  auto u = make_unit(std::move(r), options_, ok);
  if (!u)
    return ok;
  std::lock_guard lk(mu_);
  if (prefill_slots_.size() <= i)
    prefill_slots_.resize(i + 1);
  std::swap(prefill_slots_[i].u, u);
  prefill_slots_[i].down.clear();
  prefill_affinity_.forget(i);
  handoff_stats_ = std::move(stats);
  return {};
}

size_t replica_router::pick_prefill(std::span<const token_id> prompt) {
  size_t best = prefill_slots_.size();
  int32_t best_load = 0;
  auto load_of = [&](size_t i) {
    const auto g = prefill_slots_[i].u->gauges->get();
    return g.running + g.waiting;
  };
  for (size_t k = 0; k < prefill_slots_.size(); ++k) {
    const size_t i = (next_prefill_turn_ + k) % prefill_slots_.size(); // ties in turn
    if (!serving(prefill_slots_[i]))
      continue;
    if (best == prefill_slots_.size() || load_of(i) < best_load) {
      best = i;
      best_load = load_of(i);
    }
  }
  if (best == prefill_slots_.size())
    return best;
  if (auto m = prefill_affinity_.lookup(prompt);
      m && m->replica < prefill_slots_.size() && serving(prefill_slots_[m->replica]) &&
      load_of(m->replica) <= best_load + static_cast<int32_t>(affinity_slack))
    best = m->replica;
  else
    next_prefill_turn_ = best + 1;
  prefill_affinity_.record(best, prompt);
  return best;
}

void replica_router::take_down(size_t i, const std::string& why) {
  std::lock_guard lk(mu_);
  if (i >= slots_.size())
    return;
  if (const auto& u = slots_[i].u) // its live requests end with the cause, not a bare stop
    u->health->fail(why);
  slots_[i].u.reset();
  slots_[i].down = why;
}

void replica_router::take_down_prefill(size_t i, const std::string& why) {
  std::lock_guard lk(mu_);
  if (i >= prefill_slots_.size())
    return;
  if (const auto& u = prefill_slots_[i].u) // its live requests end with the cause, not a bare stop
    u->health->fail(why);
  prefill_slots_[i].u.reset();
  prefill_slots_[i].down = why;
}

// Under mu_: the serving replica for `prompt` (the least loaded; or the one holding its longest
// prefix when that is not much busier), counted as taking `n` requests.
expected<size_t> replica_router::pick_replica(std::span<const token_id> prompt, size_t n) {
  prune();
  size_t pick = slots_.size(), best_load = 0;
  std::string why;
  for (size_t k = 0; k < slots_.size(); ++k) {
    const size_t i = (next_turn_ + k) % slots_.size();
    const auto& s = slots_[i];
    if (!serving(s)) {
      const std::string down =
          s.u ? fmt::format("replica {} failed: {}", i, s.u->health->why()) : s.down;
      why += (why.empty() ? "" : "; ") + down;
      continue;
    }
    const size_t l = load(i);
    if (pick == slots_.size() || l < best_load) {
      pick = i;
      best_load = l;
    }
  }
  if (pick == slots_.size())
    return make_error(errc::unavailable,
                      "deployment '{}' is restarting, no replica is serving ({}); try again "
                      "later (`cluster status` shows its progress)",
                      deployment_, why);
  // Where the prompt's longest prefix went, unless that replica is much busier.
  if (auto m = affinity_.lookup(prompt); m && m->replica < slots_.size() &&
                                         serving(slots_[m->replica]) &&
                                         load(m->replica) <= best_load + affinity_slack)
    pick = m->replica;
  else
    next_turn_ = (pick + 1) % slots_.size();
  affinity_.record(pick, prompt);
  slots_[pick].submitted += n;
  return pick;
}

expected<seq_id> replica_router::submit(engine::request r, std::shared_ptr<request_sink> sink) {
  caf::actor target, prefill;
  std::vector<caf::actor> fallbacks;
  seq_id id = 0;
  {
    std::lock_guard lk(mu_);
    auto picked = pick_replica(r.prompt, 1);
    if (!picked)
      return std::move(picked).error();
    const size_t pick = *picked;
    id = next_id_++;
    live_[id] = {.slot = pick, .owner = slots_[pick].u, .sink = sink};
    target = slots_[pick].u->actor;
    if (const size_t p = pick_prefill(r.prompt); p < prefill_slots_.size()) {
      prefill = prefill_slots_[p].u->actor;
      ++prefill_slots_[p].submitted;
      for (size_t k = 1; k < prefill_slots_.size(); ++k) // the others, should it fail
        if (const auto& s = prefill_slots_[(p + k) % prefill_slots_.size()]; serving(s))
          fallbacks.push_back(s.u->actor);
    }
  }
  if (prefill) {
    // Both sides must draw the same random numbers: the seed is fixed here.
    if (!r.sampling.has_seed) {
      r.sampling.has_seed = true;
      r.sampling.seed = engine::mix_seed(options_.seed, id);
    }
    caf::anon_send(target, import_atom::value,
                   handoff_job{.id = id,
                               .request = std::move(r),
                               .sink = std::move(sink),
                               .prefill = std::move(prefill),
                               .fallbacks = std::move(fallbacks)});
    return id;
  }
  caf::anon_send(target, msg::submit_atom::value,
                 msg::replica_job{.id = id, .request = std::move(r), .sink = std::move(sink)});
  return id;
}

expected<std::vector<seq_id>>
replica_router::submit_choices(std::vector<engine::request> rs,
                               std::vector<std::shared_ptr<request_sink>> sinks) {
  if (rs.empty() || rs.size() != sinks.size())
    return make_error(errc::internal, "submit_choices: {} requests for {} sinks", rs.size(),
                      sinks.size());
  std::vector<seq_id> ids;
  bool disaggregated = false;
  {
    std::lock_guard lk(mu_);
    disaggregated = std::any_of(prefill_slots_.begin(), prefill_slots_.end(),
                                [this](const slot& s) { return serving(s); });
  }
  if (disaggregated || rs.size() == 1) {
    // Each choice is handed off on its own (their prompts' KV are not shared).
    for (size_t i = 0; i < rs.size(); ++i) {
      auto id = submit(std::move(rs[i]), std::move(sinks[i]));
      if (!id) {
        for (seq_id prev : ids)
          cancel(prev);
        return std::move(id).error();
      }
      ids.push_back(*id);
    }
    return ids;
  }
  caf::actor target;
  msg::replica_job job;
  {
    std::lock_guard lk(mu_);
    auto picked = pick_replica(rs.front().prompt, rs.size());
    if (!picked)
      return std::move(picked).error();
    const size_t pick = *picked;
    target = slots_[pick].u->actor;
    for (size_t i = 0; i < rs.size(); ++i) {
      const seq_id id = next_id_++;
      live_[id] = {.slot = pick, .owner = slots_[pick].u, .sink = sinks[i]};
      ids.push_back(id);
      auto& j = i == 0 ? job : job.siblings.emplace_back();
      j.id = id;
      j.request = std::move(rs[i]);
      j.sink = std::move(sinks[i]);
    }
  }
  caf::anon_send(target, msg::submit_atom::value, std::move(job));
  return ids;
}

void replica_router::cancel(seq_id id) {
  std::shared_ptr<unit> u;
  {
    std::lock_guard lk(mu_);
    auto it = live_.find(id);
    if (it == live_.end())
      return;
    u = it->second.owner.lock();
    live_.erase(it);
  }
  if (u) // the replica that took it, even if it was replaced since
    caf::anon_send(u->actor, msg::cancel_atom::value, id);
}

std::string replica_router::metrics_text(const serve_metrics& m, const std::string& model) const {
  std::vector<replica_snapshot> snaps, prefill_snaps;
  std::vector<int> up;
  std::vector<uint64_t> submitted;
  std::shared_ptr<handoff_stats> handoffs;
  {
    std::lock_guard lk(mu_);
    for (const auto& s : slots_) {
      if (s.u)
        snaps.push_back(s.u->gauges->get());
      up.push_back(serving(s) ? 1 : 0);
      submitted.push_back(s.submitted);
    }
    for (const auto& s : prefill_slots_)
      if (s.u)
        prefill_snaps.push_back(s.u->gauges->get());
    handoffs = handoff_stats_;
  }
  auto all = snaps; // both groups: a prefill replica's requests run and hold blocks too
  all.insert(all.end(), prefill_snaps.begin(), prefill_snaps.end());
  std::string out = gauges_text(all, m, model);
  if (handoffs) {
    out += "# HELP troupe_group_requests Requests running or waiting per prefill/decode group.\n"
           "# TYPE troupe_group_requests gauge\n";
    for (auto [group, list] : {std::pair{"prefill", &prefill_snaps}, {"decode", &snaps}}) {
      int32_t running = 0, waiting = 0;
      for (const auto& s : *list) {
        running += s.running;
        waiting += s.waiting;
      }
      for (auto [state, n] : {std::pair{"running", running}, {"waiting", waiting}})
        out +=
            fmt::format("troupe_group_requests{{model_name=\"{}\",group=\"{}\",state=\"{}\"}} {}\n",
                        model, group, state, n);
    }
    out += handoffs->text(model);
  }
  out += "# HELP troupe_replica_up Whether the replica serves (0: failed or restarting).\n"
         "# TYPE troupe_replica_up gauge\n";
  for (size_t i = 0; i < up.size(); ++i)
    out +=
        fmt::format("troupe_replica_up{{model_name=\"{}\",replica=\"{}\"}} {}\n", model, i, up[i]);
  out += "# HELP troupe_replica_requests_total Requests routed to the replica.\n"
         "# TYPE troupe_replica_requests_total counter\n";
  for (size_t i = 0; i < submitted.size(); ++i)
    out += fmt::format("troupe_replica_requests_total{{model_name=\"{}\",replica=\"{}\"}} {}\n",
                       model, i, submitted[i]);
  return out;
}

engine_gauges replica_router::gauges() const {
  std::vector<replica_snapshot> snaps;
  {
    std::lock_guard lk(mu_);
    for (const auto* group : {&slots_, &prefill_slots_})
      for (const auto& s : *group)
        if (s.u)
          snaps.push_back(s.u->gauges->get());
  }
  return sum_gauges(snaps);
}

int32_t replica_router::kv_blocks_in_use() const {
  std::lock_guard lk(mu_);
  int32_t n = 0;
  for (const auto* group : {&slots_, &prefill_slots_})
    for (const auto& s : *group)
      if (s.u)
        n += s.u->gauges->get().pool.blocks_used;
  return n;
}

} // namespace troupe::serve
