// The HTTP front end's Prometheus metrics: latency histograms and request/token counters,
// updated by the sessions (thread-safe) and rendered on /metrics with the serving side's gauges.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace troupe::serve {

// Fixed-bucket Prometheus histogram (seconds).
class histogram {
 public:
  void observe(double seconds);
  void render(std::string& out, const std::string& name, const std::string& help) const;

 private:
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_ = std::vector<uint64_t>(buckets().size(), 0);
  uint64_t total_ = 0;
  double sum_ = 0;
  static const std::vector<double>& buckets();
};

struct serve_metrics {
  histogram ttft, itl, e2e;
  std::atomic<uint64_t> prompt_tokens{0}, generation_tokens{0};
  void count_request(int status);
  std::string requests_text() const;

 private:
  mutable std::mutex mu_;
  std::map<int, uint64_t> by_status_;
};

} // namespace troupe::serve
