#include "actors/serving/replica_router.hpp"

#include <caf/send.hpp>
#include <fmt/format.h>

namespace troupe::serve {

replica_router::unit::~unit() {
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
}

replica_router::replica_router(caf::actor_system& sys, std::string deployment, size_t replicas,
                               engine::scheduler_options options)
  : sys_(sys), deployment_(std::move(deployment)), options_(std::move(options)), slots_(replicas) {
  for (size_t i = 0; i < replicas; ++i)
    slots_[i].down = fmt::format("replica {} is loading", i);
}

replica_router::~replica_router() {
  std::lock_guard lk(mu_);
  slots_.clear(); // each replica actor is told to stop
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

expected<void> replica_router::install(size_t i, replica_executor r) {
  if (i >= slots_.size())
    return make_error(errc::invalid_argument, "replica {} of {}", i, slots_.size());
  replica_spec spec{.options = options_,
                    .exec = std::move(r.exec),
                    .ranks = std::move(r.ranks),
                    .health = r.health ? r.health : std::make_shared<replica_health>(),
                    .gauges = std::make_shared<replica_gauges>()};
  spec.options.num_blocks = r.num_blocks;
  TROUPE_TRY_VOID(engine::validate(spec.options));
  auto u = std::make_shared<unit>();
  u->health = spec.health;
  u->gauges = spec.gauges;
  u->actor = spawn_replica(sys_, std::move(spec));
  std::lock_guard lk(mu_);
  std::swap(slots_[i].u, u);
  slots_[i].down.clear();
  return {}; // `u`, the previous replica, stops here
}

void replica_router::take_down(size_t i, const std::string& why) {
  std::lock_guard lk(mu_);
  if (i >= slots_.size())
    return;
  slots_[i].u.reset();
  slots_[i].down = why;
}

expected<seq_id> replica_router::submit(engine::request r, std::shared_ptr<request_sink> sink) {
  caf::actor target;
  seq_id id = 0;
  {
    std::lock_guard lk(mu_);
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
    next_turn_ = (pick + 1) % slots_.size();
    ++slots_[pick].submitted;
    id = next_id_++;
    live_[id] = {.slot = pick, .owner = slots_[pick].u, .sink = sink};
    target = slots_[pick].u->actor;
  }
  caf::anon_send(target, msg::submit_atom::value,
                 msg::replica_job{.id = id, .request = std::move(r), .sink = std::move(sink)});
  return id;
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
  std::vector<replica_snapshot> snaps;
  std::vector<int> up;
  std::vector<uint64_t> submitted;
  {
    std::lock_guard lk(mu_);
    for (const auto& s : slots_) {
      if (s.u)
        snaps.push_back(s.u->gauges->get());
      up.push_back(serving(s) ? 1 : 0);
      submitted.push_back(s.submitted);
    }
  }
  std::string out = gauges_text(snaps, m, model);
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
    for (const auto& s : slots_)
      if (s.u)
        snaps.push_back(s.u->gauges->get());
  }
  return sum_gauges(snaps);
}

int32_t replica_router::kv_blocks_in_use() const {
  std::lock_guard lk(mu_);
  int32_t n = 0;
  for (const auto& s : slots_)
    if (s.u)
      n += s.u->gauges->get().pool.blocks_used;
  return n;
}

} // namespace troupe::serve
