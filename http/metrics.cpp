#include "http/metrics.hpp"

#include <fmt/format.h>

namespace troupe::serve {

const std::vector<double>& histogram::latency_buckets() {
  static const std::vector<double> b = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5,
                                        0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0};
  return b;
}

const std::vector<double>& histogram::token_buckets() {
  static const std::vector<double> b = {1,    2,    5,    10,    20,    50,    100,    200,   500,
                                        1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000};
  return b;
}

histogram::histogram(const std::vector<double>& buckets)
  : buckets_(buckets), counts_(buckets.size(), 0) {}

void histogram::observe(double value) {
  std::lock_guard lk(mu_);
  for (size_t i = 0; i < buckets_.size(); ++i)
    if (value <= buckets_[i])
      ++counts_[i];
  ++total_;
  sum_ += value;
}

void histogram::render(std::string& out, const std::string& name, const std::string& help,
                       const std::string& model) const {
  std::lock_guard lk(mu_);
  out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  for (size_t i = 0; i < buckets_.size(); ++i)
    out += fmt::format("{}_bucket{{model_name=\"{}\",le=\"{}\"}} {}\n", name, model, buckets_[i],
                       counts_[i]);
  out += fmt::format("{}_bucket{{model_name=\"{}\",le=\"+Inf\"}} {}\n", name, model, total_);
  out += fmt::format("{}_sum{{model_name=\"{}\"}} {}\n{}_count{{model_name=\"{}\"}} {}\n", name,
                     model, sum_, name, model, total_);
}

void serve_metrics::count_request(int status) {
  std::lock_guard lk(mu_);
  ++by_status_[status];
}

void serve_metrics::record(const request_record& r) {
  e2e.observe(r.e2e);
  prompt_len.observe(static_cast<double>(r.prompt_tokens));
  generation_len.observe(static_cast<double>(r.generation_tokens));
  if (r.max_tokens > 0)
    max_tokens.observe(static_cast<double>(r.max_tokens));
  if (r.ttft >= 0) {
    const double q = r.queue >= 0 ? std::min(r.queue, r.ttft) : 0.0;
    if (r.queue >= 0) {
      queue.observe(q);
      prefill.observe(r.ttft - q);
    }
    decode.observe(r.e2e - r.ttft);
    inference.observe(r.e2e - q);
    if (r.generation_tokens > 1)
      tpot.observe((r.e2e - r.ttft) / static_cast<double>(r.generation_tokens - 1));
  }
  std::lock_guard lk(mu_);
  ++by_reason_[r.finish_reason];
}

std::map<std::string, uint64_t> serve_metrics::finished() const {
  std::lock_guard lk(mu_);
  return by_reason_;
}

std::string serve_metrics::requests_text(const std::string& model) const {
  std::lock_guard lk(mu_);
  std::string out = "# HELP troupe_requests_total HTTP requests by status code.\n"
                    "# TYPE troupe_requests_total counter\n";
  for (const auto& [status, n] : by_status_)
    out += fmt::format("troupe_requests_total{{model_name=\"{}\",status=\"{}\"}} {}\n", model,
                       status, n);
  for (const char* name : {"troupe_request_success_total", "vllm:request_success_total"}) {
    out += fmt::format("# HELP {} Completion requests ended, by finish reason (stop, length; "
                       "abort: cancelled or failed).\n# TYPE {} counter\n",
                       name, name);
    for (const char* reason : {"stop", "length", "abort"}) {
      auto it = by_reason_.find(reason);
      out += fmt::format("{}{{model_name=\"{}\",finished_reason=\"{}\"}} {}\n", name, model, reason,
                         it == by_reason_.end() ? 0 : it->second);
    }
  }
  return out;
}

std::string metrics_text(const engine_gauges& g, const serve_metrics& m,
                         const std::string& model_name) {
  std::string model; // a label value: \, " and newlines escaped
  for (char c : model_name)
    model += c == '\\' ? "\\\\" : c == '"' ? "\\\"" : c == '\n' ? "\\n" : std::string(1, c);
  std::string out = m.requests_text(model);
  auto one = [&](const char* type, const std::string& name, const char* help, auto value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{}{{model_name=\"{}\"}} {}\n", name, help, name,
                       type, name, model, value);
  };
  // Both names of each: troupe's, then vLLM's ("" where vLLM has none).
  auto both = [&](const char* type, const char* troupe, const char* vllm, const char* help,
                  auto value) {
    one(type, troupe, help, value);
    if (*vllm)
      one(type, vllm, help, value);
  };
  both("gauge", "troupe_num_requests_running", "vllm:num_requests_running",
       "Requests running in the batch.", g.running);
  both("gauge", "troupe_num_requests_waiting", "vllm:num_requests_waiting",
       "Requests waiting to be scheduled.", g.waiting);
  both("gauge", "troupe_kv_blocks_in_use", "", "KV cache blocks referenced by requests.",
       g.kv_blocks_used);
  both("gauge", "troupe_kv_blocks_total", "", "KV cache blocks in the pool.", g.kv_blocks_total);
  both("gauge", "troupe_kv_cache_usage_perc", "vllm:kv_cache_usage_perc",
       "Fraction of KV cache blocks in use (0 to 1).", g.kv_usage());
  one("gauge", "vllm:gpu_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
      g.kv_usage());
  both("gauge", "troupe_prefix_cache_hit_rate", "",
       "Prefix cache hits per full-block lookup, since the start.",
       g.prefix_lookups ? static_cast<double>(g.prefix_hits) / g.prefix_lookups : 0.0);
  both("counter", "troupe_prefix_cache_hit_tokens_total", "",
       "Prompt tokens served from the prefix cache.", g.prefix_hit_tokens);
  both("counter", "troupe_prefix_cache_queries_total", "vllm:prefix_cache_queries_total",
       "Prompt tokens looked up in the prefix cache.", m.prompt_tokens.load());
  both("counter", "troupe_prefix_cache_hits_total", "vllm:prefix_cache_hits_total",
       "Prompt tokens found in the prefix cache.", g.prefix_hit_tokens);
  both("counter", "troupe_shared_prompt_tokens_total", "",
       "Prompt tokens a choice of an n > 1 request took from a sibling's KV blocks instead of "
       "computing them.",
       g.shared_prompt_tokens);
  both("counter", "troupe_num_preemptions_total", "vllm:num_preemptions_total",
       "Requests preempted (recomputed later).", g.preemptions);
  both("counter", "troupe_prompt_tokens_total", "vllm:prompt_tokens_total",
       "Prompt tokens of accepted requests.", m.prompt_tokens.load());
  both("counter", "troupe_generation_tokens_total", "vllm:generation_tokens_total",
       "Tokens generated.", m.generation_tokens.load());
  struct family {
    const histogram& h;
    const char *troupe, *vllm, *help;
  };
  const family hs[] = {
      {m.ttft, "troupe_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
       "Time to first token."},
      {m.itl, "troupe_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
       "Time between output tokens."},
      {m.itl, "", "vllm:time_per_output_token_seconds", "Time between output tokens."},
      {m.tpot, "troupe_request_time_per_output_token_seconds",
       "vllm:request_time_per_output_token_seconds",
       "Per request: (e2e - time to first token) / (output tokens - 1)."},
      {m.e2e, "troupe_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
       "Request latency, end to end."},
      {m.queue, "troupe_request_queue_time_seconds", "vllm:request_queue_time_seconds",
       "Time a request waited before it was first scheduled."},
      {m.prefill, "troupe_request_prefill_time_seconds", "vllm:request_prefill_time_seconds",
       "From first scheduled to the first token."},
      {m.decode, "troupe_request_decode_time_seconds", "vllm:request_decode_time_seconds",
       "From the first token to the last."},
      {m.inference, "troupe_request_inference_time_seconds", "vllm:request_inference_time_seconds",
       "From first scheduled to the last token."},
      {m.prompt_len, "troupe_request_prompt_tokens", "vllm:request_prompt_tokens",
       "Prompt tokens per request."},
      {m.generation_len, "troupe_request_generation_tokens", "vllm:request_generation_tokens",
       "Generated tokens per request."},
      {m.max_tokens, "troupe_request_params_max_tokens", "vllm:request_params_max_tokens",
       "The max_tokens parameter per request."},
  };
  for (const auto& f : hs) {
    if (*f.troupe)
      f.h.render(out, f.troupe, f.help, model);
    f.h.render(out, f.vllm, f.help, model);
  }
  return out;
}

} // namespace troupe::serve
