#include "actors/serving/replica_router.hpp"

#include <fmt/format.h>

namespace troupe::serve {

void replica_health::fail(const std::string& why) {
  std::lock_guard lk(mu_);
  if (!failed_.exchange(true))
    why_ = why;
}

std::string replica_health::why() const {
  std::lock_guard lk(mu_);
  return why_;
}

replica_router::replica_router(std::string deployment, size_t replicas,
                               engine::scheduler_options options)
  : deployment_(std::move(deployment)), options_(std::move(options)), slots_(replicas) {
  for (size_t i = 0; i < replicas; ++i)
    slots_[i].down = fmt::format("replica {} is loading", i);
}

replica_router::~replica_router() {
  std::vector<std::shared_ptr<unit>> units;
  {
    std::lock_guard lk(mu_);
    for (auto& s : slots_)
      units.push_back(std::move(s.u));
  }
  units.clear(); // each engine thread stops (outside the lock)
}

bool replica_router::serving(const slot& s) const {
  return s.u && !(s.u->r.health && s.u->r.health->failed());
}

void replica_router::prune() {
  for (auto it = live_.begin(); it != live_.end();)
    it = it->second.sink.expired() || it->second.owner.expired() ? live_.erase(it) : ++it;
}

size_t replica_router::load(size_t i) const {
  size_t n = static_cast<size_t>(slots_[i].submitting);
  for (const auto& [id, l] : live_)
    n += l.slot == i;
  return n;
}

expected<void> replica_router::install(size_t i, replica_executor r) {
  if (i >= slots_.size())
    return make_error(errc::invalid_argument, "replica {} of {}", i, slots_.size());
  auto so = options_;
  so.num_blocks = r.num_blocks;
  TROUPE_TRY_VOID(engine::validate(so));
  auto u = std::make_shared<unit>();
  u->r = std::move(r);
  u->engine = std::make_unique<serving_engine>(so, *u->r.exec);
  {
    std::lock_guard lk(mu_);
    std::swap(slots_[i].u, u);
    slots_[i].down.clear();
  }
  return {}; // `u`, the previous engine, stops here unless a request still uses it
}

void replica_router::take_down(size_t i, const std::string& why) {
  std::shared_ptr<unit> old;
  {
    std::lock_guard lk(mu_);
    if (i >= slots_.size())
      return;
    old = std::move(slots_[i].u);
    slots_[i].down = why;
  }
}

expected<seq_id> replica_router::submit(engine::request r, std::shared_ptr<request_sink> sink) {
  std::shared_ptr<unit> u;
  size_t pick = slots_.size();
  {
    std::lock_guard lk(mu_);
    prune();
    size_t best_load = 0;
    std::string why;
    for (size_t k = 0; k < slots_.size(); ++k) {
      const size_t i = (next_turn_ + k) % slots_.size();
      if (!serving(slots_[i])) {
        const auto& s = slots_[i];
        const std::string down =
            s.u ? fmt::format("replica {} failed: {}", i, s.u->r.health->why()) : s.down;
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
    u = slots_[pick].u;
    ++slots_[pick].submitting;
  }
  std::weak_ptr<request_sink> watched = sink;
  auto got = u->engine->submit(std::move(r), std::move(sink));
  std::lock_guard lk(mu_);
  --slots_[pick].submitting;
  if (!got)
    return std::move(got).error();
  ++slots_[pick].submitted;
  const seq_id id = next_id_++;
  live_[id] = {.slot = pick, .owner = u, .local = *got, .sink = std::move(watched)};
  return id;
}

void replica_router::cancel(seq_id id) {
  std::shared_ptr<unit> u;
  seq_id local = 0;
  {
    std::lock_guard lk(mu_);
    auto it = live_.find(id);
    if (it == live_.end())
      return;
    u = it->second.owner.lock();
    local = it->second.local;
    live_.erase(it);
  }
  if (u)
    u->engine->cancel(local); // the replica that took it, even if it was replaced since
}

std::string replica_router::metrics_text(const serve_metrics& m, const std::string& model) const {
  std::vector<std::shared_ptr<unit>> units;
  std::vector<int> up;
  std::vector<uint64_t> submitted;
  {
    std::lock_guard lk(mu_);
    for (const auto& s : slots_) {
      if (s.u)
        units.push_back(s.u);
      up.push_back(serving(s) ? 1 : 0);
      submitted.push_back(s.submitted);
    }
  }
  std::vector<const serving_engine*> engines;
  for (const auto& u : units)
    engines.push_back(u->engine.get());
  std::string out = serving_engine::metrics_text(engines, m, model);
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

int32_t replica_router::kv_blocks_in_use() const {
  std::vector<std::shared_ptr<unit>> units;
  {
    std::lock_guard lk(mu_);
    for (const auto& s : slots_)
      if (s.u)
        units.push_back(s.u);
  }
  int32_t n = 0;
  for (const auto& u : units)
    n += u->engine->kv_blocks_in_use();
  return n;
}

} // namespace troupe::serve
