// One replica's engine thread: it owns the engine_loop (scheduler + executor) and steps while
// requests are active; HTTP sessions submit requests and receive each step's outputs through a
// per-request channel (http/request_channel.hpp).
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

#include "engine/exec/local_executor.hpp"
#include "engine/scheduler/engine_loop.hpp"
#include "http/metrics.hpp"
#include "http/serving_port.hpp"

namespace troupe::serve {

class serving_engine {
 public:
  // `exec` must outlive the engine. Starts the engine thread.
  serving_engine(engine::scheduler_options options, engine::executor& exec);
  ~serving_engine(); // stops and joins the engine thread

  // Queues a request whose outputs go to `sink`; returns its id in this engine. Blocks until
  // the engine thread has taken it (at most one step). Errors as scheduler::add.
  expected<seq_id> submit(engine::request r, std::shared_ptr<request_sink> sink);
  // Cancels a live request and frees its blocks (no-op if it already finished).
  void cancel(seq_id id);

  int32_t kv_blocks_in_use() const;
  // Prometheus text of the gauges of `engines` (the replicas of one deployment, summed; the
  // prefix-cache hit rate over all their lookups) plus `m`'s counters and histograms.
  static std::string metrics_text(const std::vector<const serving_engine*>& engines,
                                  const serve_metrics& m, const std::string& model);

 private:
  using add_result = expected<seq_id>;
  struct pending_add {
    engine::request r;
    std::shared_ptr<request_sink> sink;
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

  engine::engine_loop loop_;                                        // engine thread only
  std::unordered_map<seq_id, std::shared_ptr<request_sink>> sinks_; // engine thread only

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
