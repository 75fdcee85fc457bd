// The in-process serving engine: one engine thread owns the engine_loop (scheduler + local
// executor) and steps while requests are active; HTTP threads submit requests and receive each
// step's outputs through a per-request channel. Also keeps the Prometheus metrics.
// submit() blocks until the engine thread has taken the request (at most one step); cancel()
// and the metrics never wait for a step.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "engine/scheduler/engine_loop.hpp"
#include "engine/scheduler/local_executor.hpp"

namespace troupe::serve {

// One request's outputs, filled by the engine thread and drained by its HTTP session.
class request_channel {
 public:
  // `why`: the engine failure that ended the request (with failed).
  void push(const engine::request_output& o, bool failed, const std::string& why = {});
  // Waits up to `ms` for outputs; moves them into `out`. Returns false on timeout.
  bool wait(std::vector<engine::request_output>& out, int ms);
  bool failed() const { return failed_; }
  std::string failure() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<engine::request_output> q_;
  std::atomic<bool> failed_{false};
  std::string why_;
};

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

class serving_engine {
 public:
  // `exec` must outlive the engine. Starts the engine thread.
  serving_engine(engine::scheduler_options options, engine::executor& exec);
  ~serving_engine(); // stops and joins the engine thread

  // Queues a request; its outputs arrive on the returned channel. Errors as scheduler::add.
  expected<std::pair<seq_id, std::shared_ptr<request_channel>>> submit(engine::request r);
  // Cancels a live request and frees its blocks (no-op if it already finished).
  void cancel(seq_id id);

  int32_t kv_blocks_in_use() const;
  // Prometheus text of the gauges of `engines` (the replicas of one deployment, summed; the
  // prefix-cache hit rate over all their lookups) plus `m`'s counters and histograms.
  static std::string metrics_text(const std::vector<const serving_engine*>& engines,
                                  const serve_metrics& m, const std::string& model);

 private:
  using add_result = expected<std::pair<seq_id, std::shared_ptr<request_channel>>>;
  struct pending_add {
    engine::request r;
    std::promise<add_result> done;
  };
  struct snapshot {
    int32_t running = 0, waiting = 0;
    uint64_t preemptions = 0, prefix_hit_tokens = 0;
    engine::pool_usage pool;
  };
  void run();
  void take_inbox(std::deque<pending_add>& adds, std::vector<seq_id>& cancels);
  void step_once();
  void publish();

  engine::engine_loop loop_;                                              // engine thread only
  std::unordered_map<seq_id, std::shared_ptr<request_channel>> channels_; // engine thread only

  std::mutex inbox_mu_;
  std::condition_variable cv_;
  std::deque<pending_add> adds_;
  std::vector<seq_id> cancels_;
  bool stop_ = false;

  mutable std::mutex snap_mu_;
  snapshot snap_;
  std::thread thread_;
};

} // namespace troupe::serve
