#include "actors/serving/serving_engine.hpp"

#include <fmt/format.h>

#include "runtime/log.hpp"

namespace troupe::serve {

serving_engine::serving_engine(engine::scheduler_options options, engine::executor& exec)
  : loop_(std::move(options), exec) {
  publish();
  thread_ = std::thread([this] { run(); });
}

serving_engine::~serving_engine() {
  {
    std::lock_guard lk(inbox_mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& a : adds_)
    a.done.set_value(make_error(errc::cancelled, "the server is shutting down"));
}

auto serving_engine::submit(engine::request r, std::shared_ptr<request_sink> sink) -> add_result {
  std::future<add_result> f;
  {
    std::lock_guard lk(inbox_mu_);
    if (stop_)
      return make_error(errc::cancelled, "the server is shutting down");
    adds_.push_back({std::move(r), std::move(sink), {}});
    f = adds_.back().done.get_future();
  }
  cv_.notify_all();
  return f.get();
}

void serving_engine::cancel(seq_id id) {
  {
    std::lock_guard lk(inbox_mu_);
    cancels_.push_back(id);
  }
  cv_.notify_all();
}

void serving_engine::take_inbox(std::deque<pending_add>& adds, std::vector<seq_id>& cancels) {
  std::unique_lock lk(inbox_mu_);
  cv_.wait(lk,
           [&] { return stop_ || !adds_.empty() || !cancels_.empty() || loop_.has_unfinished(); });
  if (stop_)
    return;
  adds.swap(adds_);
  cancels.swap(cancels_);
}

void serving_engine::run() {
  std::deque<pending_add> adds;
  std::vector<seq_id> cancels;
  for (;;) {
    adds.clear();
    cancels.clear();
    take_inbox(adds, cancels);
    {
      std::lock_guard lk(inbox_mu_);
      if (stop_)
        break;
    }
    for (auto& a : adds) {
      auto id = loop_.add_request(std::move(a.r));
      if (!id) {
        a.done.set_value(std::move(id).error());
        continue;
      }
      sinks_[*id] = std::move(a.sink);
      a.done.set_value(*id);
    }
    for (auto id : cancels)
      if (sinks_.erase(id) > 0)
        (void)loop_.cancel(id); // not_found when it finished in the meantime
    if (loop_.has_unfinished())
      step_once();
    publish();
  }
  const auto down = make_error(errc::cancelled, "the server is shutting down");
  for (auto& [id, sink] : sinks_) // shutdown: every live request ends
    sink->fail(down);
  sinks_.clear();
}

void serving_engine::step_once() {
  auto out = loop_.step();
  if (!out) {
    log::error("engine step failed, ending every request: {}", out.error().to_string());
    for (const auto& o : loop_.fail_all())
      if (auto it = sinks_.find(o.id); it != sinks_.end()) {
        it->second->fail(out.error());
        sinks_.erase(it);
      }
    return;
  }
  for (const auto& o : *out) {
    auto it = sinks_.find(o.id);
    if (it == sinks_.end())
      continue;
    it->second->push(o);
    if (o.finish != engine::finish_reason::none)
      sinks_.erase(it);
  }
}

void serving_engine::publish() {
  const auto st = loop_.stats();
  const auto pool = loop_.usage();
  std::lock_guard lk(snap_mu_);
  snap_ = {.running = st.num_running,
           .waiting = st.num_waiting,
           .preemptions = st.preemptions,
           .prefix_hit_tokens = st.prefix_hit_tokens,
           .pool = pool};
}

int32_t serving_engine::kv_blocks_in_use() const {
  std::lock_guard lk(snap_mu_);
  return snap_.pool.blocks_used;
}

std::string serving_engine::metrics_text(const std::vector<const serving_engine*>& engines,
                                         const serve_metrics& m, const std::string& model) {
  snapshot s;
  for (const auto* e : engines) {
    std::lock_guard lk(e->snap_mu_);
    s.running += e->snap_.running;
    s.waiting += e->snap_.waiting;
    s.preemptions += e->snap_.preemptions;
    s.prefix_hit_tokens += e->snap_.prefix_hit_tokens;
    s.pool += e->snap_.pool;
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
