#include "actors/serving/replica_status.hpp"

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

void replica_gauges::publish(const engine::engine_loop& loop) {
  const auto st = loop.stats();
  const auto pool = loop.usage();
  std::lock_guard lk(mu_);
  snap_ = {.running = st.num_running,
           .waiting = st.num_waiting,
           .preemptions = st.preemptions,
           .prefix_hit_tokens = st.prefix_hit_tokens,
           .pool = pool};
}

replica_snapshot replica_gauges::get() const {
  std::lock_guard lk(mu_);
  return snap_;
}

std::string gauges_text(const std::vector<replica_snapshot>& replicas, const serve_metrics& m,
                        const std::string& model) {
  replica_snapshot s;
  for (const auto& r : replicas) {
    s.running += r.running;
    s.waiting += r.waiting;
    s.preemptions += r.preemptions;
    s.prefix_hit_tokens += r.prefix_hit_tokens;
    s.pool += r.pool;
  }
  std::string out = m.requests_text();
  auto gauge = [&](const char* name, const char* help, auto value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} gauge\n{}{{model_name=\"{}\"}} {}\n", name, help,
                       name, name, model, value);
  };
  auto counter = [&](const char* name, const char* help, auto value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} counter\n{}{{model_name=\"{}\"}} {}\n", name, help,
                       name, name, model, value);
  };
  gauge("troupe_num_requests_running", "Sequences running in the batch.", s.running);
  gauge("troupe_num_requests_waiting", "Sequences waiting to be scheduled.", s.waiting);
  gauge("troupe_kv_blocks_in_use", "KV cache blocks referenced by sequences.", s.pool.blocks_used);
  gauge("troupe_kv_blocks_total", "KV cache blocks in the pool.", s.pool.num_blocks);
  gauge("troupe_kv_cache_usage_perc", "Fraction of KV cache blocks in use.",
        s.pool.num_blocks ? static_cast<double>(s.pool.blocks_used) / s.pool.num_blocks : 0.0);
  gauge("troupe_prefix_cache_hit_rate", "Prefix cache hits per full-block lookup.",
        s.pool.hit_rate());
  counter("troupe_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
          s.prefix_hit_tokens);
  counter("troupe_num_preemptions_total", "Sequences preempted (recomputed later).", s.preemptions);
  counter("troupe_prompt_tokens_total", "Prompt tokens of accepted requests.",
          m.prompt_tokens.load());
  counter("troupe_generation_tokens_total", "Tokens generated.", m.generation_tokens.load());
  m.ttft.render(out, "troupe_time_to_first_token_seconds", "Time to first token.");
  m.itl.render(out, "troupe_inter_token_latency_seconds", "Time between output tokens.");
  m.e2e.render(out, "troupe_e2e_request_latency_seconds", "Request latency, end to end.");
  return out;
}

} // namespace troupe::serve
