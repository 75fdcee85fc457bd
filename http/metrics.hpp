// The HTTP front end's Prometheus metrics: per-request histograms and counters, updated by the
// sessions (thread-safe), and the /metrics text: these plus the engines' gauges (summed over the
// replicas by the serving side), every family labelled model_name. Each family is exported under
// troupe's name (troupe_...) and, where vLLM has the same meaning, under vLLM's (vllm:...), so
// that dashboards built for vLLM work unchanged.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace troupe::serve {

// Fixed-bucket Prometheus histogram.
class histogram {
 public:
  explicit histogram(const std::vector<double>& buckets = latency_buckets());
  void observe(double value);
  void render(std::string& out, const std::string& name, const std::string& help,
              const std::string& model) const;

  static const std::vector<double>& latency_buckets(); // seconds
  static const std::vector<double>& token_buckets();   // 1, 2, 5, 10, 20, 50, ... tokens

 private:
  const std::vector<double>& buckets_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;
  uint64_t total_ = 0;
  double sum_ = 0;
};

// One finished (or failed) completion request, as the session measured it. Times in seconds;
// negative: not measured (no token came, or the engine did not say).
struct request_record {
  std::string finish_reason; // stop | length | abort
  int64_t prompt_tokens = 0, generation_tokens = 0, max_tokens = 0;
  double e2e = 0, ttft = -1, queue = -1;
};

struct serve_metrics {
  histogram ttft, itl, e2e, tpot, queue, prefill, decode, inference;
  histogram prompt_len{histogram::token_buckets()}, generation_len{histogram::token_buckets()},
      max_tokens{histogram::token_buckets()};
  std::atomic<uint64_t> prompt_tokens{0}, generation_tokens{0};
  void count_request(int status);
  // A completion request ended: its histograms and request_success_total{finished_reason}.
  void record(const request_record& r);
  std::string requests_text(const std::string& model) const;
  // Finished requests by reason, and HTTP requests by status (for the periodic stats line).
  std::map<std::string, uint64_t> finished() const;

 private:
  mutable std::mutex mu_;
  std::map<int, uint64_t> by_status_;
  std::map<std::string, uint64_t> by_reason_;
};

// The engines' gauges summed over the replicas.
struct engine_gauges {
  int64_t running = 0, waiting = 0, kv_blocks_used = 0, kv_blocks_total = 0;
  uint64_t preemptions = 0, prefix_hit_tokens = 0, prefix_lookups = 0, prefix_hits = 0;
  uint64_t shared_prompt_tokens = 0; // `n` choices: prompt tokens taken from a sibling's KV
  double kv_usage() const {
    return kv_blocks_total ? static_cast<double>(kv_blocks_used) / kv_blocks_total : 0.0;
  }
};

// The /metrics text for one model: `m`'s counters and histograms and the engines' gauges,
// under troupe's and vLLM's names.
std::string metrics_text(const engine_gauges& g, const serve_metrics& m, const std::string& model);

} // namespace troupe::serve
