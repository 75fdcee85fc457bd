#include "cli/serve/serving_engine.hpp"

#include <fmt/format.h>

#include "runtime/log.hpp"

namespace troupe::serve {

void request_channel::push(const engine::request_output& o, bool failed, const std::string& why) {
  {
    std::lock_guard lk(mu_);
    q_.push_back(o);
    if (failed) {
      failed_ = true;
      if (why_.empty())
        why_ = why;
    }
  }
  cv_.notify_one();
}

std::string request_channel::failure() const {
  std::lock_guard lk(mu_);
  return why_;
}

bool request_channel::wait(std::vector<engine::request_output>& out, int ms) {
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, std::chrono::milliseconds(ms), [&] { return !q_.empty(); }))
    return false;
  out.insert(out.end(), q_.begin(), q_.end());
  q_.clear();
  return true;
}

const std::vector<double>& histogram::buckets() {
  static const std::vector<double> b = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5,
                                        0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0};
  return b;
}

void histogram::observe(double seconds) {
  std::lock_guard lk(mu_);
  for (size_t i = 0; i < buckets().size(); ++i)
    if (seconds <= buckets()[i])
      ++counts_[i];
  ++total_;
  sum_ += seconds;
}

void histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  std::lock_guard lk(mu_);
  out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  for (size_t i = 0; i < buckets().size(); ++i)
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, buckets()[i], counts_[i]);
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, total_, name,
                     sum_, name, total_);
}

void serve_metrics::count_request(int status) {
  std::lock_guard lk(mu_);
  ++by_status_[status];
}

std::string serve_metrics::requests_text() const {
  std::lock_guard lk(mu_);
  std::string out = "# HELP troupe_requests_total HTTP requests by status code.\n"
                    "# TYPE troupe_requests_total counter\n";
  for (const auto& [status, n] : by_status_)
    out += fmt::format("troupe_requests_total{{status=\"{}\"}} {}\n", status, n);
  return out;
}

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

auto serving_engine::submit(engine::request r) -> add_result {
  std::future<add_result> f;
  {
    std::lock_guard lk(inbox_mu_);
    if (stop_)
      return make_error(errc::cancelled, "the server is shutting down");
    adds_.push_back({std::move(r), {}});
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
      auto ch = std::make_shared<request_channel>();
      channels_[*id] = ch;
      a.done.set_value(std::make_pair(*id, ch));
    }
    for (auto id : cancels)
      if (channels_.erase(id) > 0)
        (void)loop_.cancel(id); // not_found when it finished in the meantime
    if (loop_.has_unfinished())
      step_once();
    publish();
  }
  for (auto& [id, ch] : channels_) // shutdown: every live request ends as cancelled
    ch->push({.id = id, .finish = engine::finish_reason::cancelled}, true);
  channels_.clear();
}

void serving_engine::step_once() {
  auto out = loop_.step();
  bool failed = false;
  std::string why;
  std::vector<engine::request_output> outs;
  if (out) {
    outs = std::move(*out);
  } else {
    log::error("engine step failed, ending every request: {}", out.error().to_string());
    outs = loop_.fail_all();
    failed = true;
    why = out.error().message();
  }
  for (const auto& o : outs) {
    auto it = channels_.find(o.id);
    if (it == channels_.end())
      continue;
    it->second->push(o, failed, why);
    if (o.finish != engine::finish_reason::none)
      channels_.erase(it);
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
  gauge("troupe_kv_blocks_in_use", "KV cache blocks referenced by sequences.",
        s.pool.blocks_used);
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
