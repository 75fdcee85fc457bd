#include "engine/model/load_progress.hpp"

namespace troupe::engine {

load_progress::load_progress(uint64_t total, load_callback report,
                             std::chrono::milliseconds interval)
  : total_(total), report_(std::move(report)), interval_(interval),
    start_(std::chrono::steady_clock::now()),
    next_due_((start_ + interval_).time_since_epoch().count()) {
  std::lock_guard lk(mu_);
  report_locked(false);
}

double load_progress::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void load_progress::report_locked(bool done) {
  reported_ = bytes_.load(std::memory_order_relaxed);
  ++reports_;
  if (report_)
    report_({.bytes = reported_, .total = total_, .elapsed_s = elapsed_s(), .done = done});
}

void load_progress::add(uint64_t bytes) {
  bytes_.fetch_add(bytes, std::memory_order_relaxed);
  const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
  int64_t due = next_due_.load(std::memory_order_relaxed);
  // One thread claims the report that is due; the others go on reading.
  if (now < due || !next_due_.compare_exchange_strong(due, now + interval_.count()))
    return;
  std::lock_guard lk(mu_);
  if (!finished_ && bytes_.load(std::memory_order_relaxed) > reported_)
    report_locked(false);
}

void load_progress::finish() {
  std::lock_guard lk(mu_);
  if (finished_)
    return;
  finished_ = true;
  report_locked(true);
}

int load_progress::reports() const {
  std::lock_guard lk(mu_);
  return reports_;
}

expected<std::vector<float>> counted_weights::counted(expected<std::vector<float>> got,
                                                      const weight_slice& slice) const {
  if (!got)
    return got;
  auto n = inner_.read_bytes(slice);
  if (!n)
    return std::move(n).error();
  progress_.add(*n);
  return got;
}

expected<std::vector<float>> counted_weights::load_f32(std::string_view name,
                                                       std::vector<int64_t> shape) const {
  weight_slice s{std::string(name), shape, 0, shape.empty() ? 0 : shape.front(), false};
  return counted(inner_.load_f32(name, std::move(shape)), s);
}

expected<std::vector<float>> counted_weights::load_f32_rows(std::string_view name,
                                                            std::vector<int64_t> shape,
                                                            int64_t row_begin,
                                                            int64_t row_end) const {
  weight_slice s{std::string(name), shape, row_begin, row_end, false};
  return counted(inner_.load_f32_rows(name, std::move(shape), row_begin, row_end), s);
}

expected<std::vector<float>> counted_weights::load_f32_cols(std::string_view name,
                                                            std::vector<int64_t> shape,
                                                            int64_t col_begin,
                                                            int64_t col_end) const {
  weight_slice s{std::string(name), shape, col_begin, col_end, true};
  return counted(inner_.load_f32_cols(name, std::move(shape), col_begin, col_end), s);
}

expected<uint64_t> total_read_bytes(const weight_source& weights,
                                    const std::vector<weight_slice>& slices) {
  uint64_t total = 0;
  for (const auto& s : slices) {
    auto n = weights.read_bytes(s);
    if (!n)
      return std::move(n).error();
    total += *n;
  }
  return total;
}

} // namespace troupe::engine
