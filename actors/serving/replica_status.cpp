#include "actors/serving/replica_status.hpp"

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

void replica_gauges::publish(const engine::engine_loop& loop) {
  const auto st = loop.stats();
  const auto pool = loop.usage();
  std::lock_guard lk(mu_);
  snap_ = {.running = st.num_running,
           .waiting = st.num_waiting,
           .preemptions = st.preemptions,
           .prefix_hit_tokens = st.prefix_hit_tokens,
           .shared_prompt_tokens = st.shared_prompt_tokens,
           .pool = pool};
}

replica_snapshot replica_gauges::get() const {
  std::lock_guard lk(mu_);
  return snap_;
}

engine_gauges sum_gauges(const std::vector<replica_snapshot>& replicas) {
  engine_gauges g;
  for (const auto& r : replicas) {
    g.running += r.running;
    g.waiting += r.waiting;
    g.preemptions += r.preemptions;
    g.prefix_hit_tokens += r.prefix_hit_tokens;
    g.shared_prompt_tokens += r.shared_prompt_tokens;
    g.kv_blocks_used += r.pool.blocks_used;
    g.kv_blocks_total += r.pool.num_blocks;
    g.prefix_lookups += r.pool.lookups;
    g.prefix_hits += r.pool.hits;
  }
  return g;
}

std::string gauges_text(const std::vector<replica_snapshot>& replicas, const serve_metrics& m,
                        const std::string& model) {
  return metrics_text(sum_gauges(replicas), m, model);
}

} // namespace troupe::serve
