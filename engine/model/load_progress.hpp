// Load progress of one rank: the bytes of its weights read so far against the total it will read
// (the sum of weight_source::read_bytes over the slices its backend loads, known before the first
// read), reported through a callback at most every `interval` while it loads and once at the
// end. The backend loaders count through a counted_weights source (and the CUDA uploader for
// the bytes it copies directly); `cluster serve` shows the reports. No global state: one object
// per load, owned by whoever loads.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>

#include "engine/model/weight_source.hpp"

namespace troupe::engine {

struct load_report {
  uint64_t bytes = 0;   // read so far
  uint64_t total = 0;   // the rank's total
  double elapsed_s = 0; // since the load began
  bool done = false;    // the last report: every read has finished
};

// Called on whichever thread read the bytes (a loader thread); reports never overlap and their
// bytes never decrease. Keep it cheap: it runs inside the load.
using load_callback = std::function<void(const load_report&)>;

class load_progress {
 public:
  // Reports 0 of `total` at once (so the total is known before the first byte is read).
  load_progress(uint64_t total, load_callback report,
                std::chrono::milliseconds interval = std::chrono::milliseconds(250));
  load_progress(const load_progress&) = delete;
  load_progress& operator=(const load_progress&) = delete;

  // Adds bytes read; reports when `interval` has passed since the last report. Thread-safe and
  // lock-free unless a report is due.
  void add(uint64_t bytes);
  // The last report (done = true, bytes as counted), once; later adds report nothing.
  void finish();

  uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  uint64_t total() const { return total_; }
  int reports() const; // how many reports were made (tests)

 private:
  void report_locked(bool done);
  double elapsed_s() const;

  const uint64_t total_;
  const load_callback report_;
  const std::chrono::steady_clock::duration interval_;
  const std::chrono::steady_clock::time_point start_;
  std::atomic<uint64_t> bytes_{0};
  std::atomic<int64_t> next_due_; // steady_clock ticks of the next report
  mutable std::mutex mu_;         // serialises reports
  uint64_t reported_ = 0;
  int reports_ = 0;
  bool finished_ = false;
};

// A weight_source that counts every slice it loads (read_bytes of the inner source) into a
// load_progress. store() is the inner store, so that a loader copying its bytes directly counts
// those itself (load_progress::add).
class counted_weights final : public weight_source {
 public:
  counted_weights(const weight_source& inner, load_progress& progress)
    : inner_(inner), progress_(progress) {}

  bool contains(std::string_view name) const override { return inner_.contains(name); }
  expected<std::vector<float>> load_f32(std::string_view name,
                                        std::vector<int64_t> shape) const override;
  expected<std::vector<float>> load_f32_rows(std::string_view name, std::vector<int64_t> shape,
                                             int64_t row_begin, int64_t row_end) const override;
  expected<std::vector<float>> load_f32_cols(std::string_view name, std::vector<int64_t> shape,
                                             int64_t col_begin, int64_t col_end) const override;
  expected<uint64_t> read_bytes(const weight_slice& slice) const override {
    return inner_.read_bytes(slice);
  }
  const weight_store* store() const override { return inner_.store(); }

 private:
  expected<std::vector<float>> counted(expected<std::vector<float>> got,
                                       const weight_slice& slice) const;
  const weight_source& inner_;
  load_progress& progress_;
};

// The bytes `weights` reads for all of `slices` (a rank's total); the first error.
expected<uint64_t> total_read_bytes(const weight_source& weights,
                                    const std::vector<weight_slice>& slices);

} // namespace troupe::engine
