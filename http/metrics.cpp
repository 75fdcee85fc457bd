#include "http/metrics.hpp"

#include <fmt/format.h>

namespace troupe::serve {

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

} // namespace troupe::serve
