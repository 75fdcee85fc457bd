// What the router reads of a replica without asking its actor: whether it serves
// (replica_health) and its gauges (replica_gauges, published by the replica actor after each
// step). Both thread-safe and never blocking beyond a short lock; gauges_text renders /metrics.
#pragma once

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "engine/scheduler/engine_loop.hpp"
#include "http/metrics.hpp"

namespace troupe::serve {

// Marked failed by the replica actor when its executor or a rank fails (and by the serving
// actor when an idle replica's worker goes down); the router then sends no more requests there.
class replica_health {
 public:
  void fail(const std::string& why);
  bool failed() const { return failed_.load(); }
  std::string why() const;

 private:
  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  std::string why_;
};

// One replica's gauges after its last step.
struct replica_snapshot {
  int32_t running = 0, waiting = 0;
  uint64_t preemptions = 0, prefix_hit_tokens = 0, shared_prompt_tokens = 0;
  engine::pool_usage pool;
};

class replica_gauges {
 public:
  void publish(const engine::engine_loop& loop);
  replica_snapshot get() const;

 private:
  mutable std::mutex mu_;
  replica_snapshot snap_;
};

// Prometheus text of the replicas' gauges summed (the prefix-cache hit rate over all their
// lookups) plus `m`'s counters and histograms.
engine_gauges sum_gauges(const std::vector<replica_snapshot>& replicas);
std::string gauges_text(const std::vector<replica_snapshot>& replicas, const serve_metrics& m,
                        const std::string& model);

} // namespace troupe::serve
