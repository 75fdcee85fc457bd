// The router between the replicas of one deployment (design.md §1, §3 step 2): each replica is
// a serving_engine over its own executor (its own worker ranks); submit() sends a request to the
// healthy replica with the fewest unfinished requests (ties in turn), cancel() to the replica
// that took it, /metrics sums the replicas. The HTTP sessions call it (serve_context); the
// deployment installs each replica's engine, and through it the head's serving actor takes a
// failed replica out (take_down) and swaps a restarted one in (install). With no replica
// serving, submit() fails with errc::unavailable (HTTP 503) saying why. Thread-safe; submit()
// blocks like serving_engine::submit (at most one step of the chosen replica); install() and
// take_down() block while the replaced engine's thread stops.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actors/serving/serving_engine.hpp"
#include "http/serving_port.hpp"

namespace troupe::serve {

// Set by a replica's executor when it fails (on its engine thread), read by the router, which
// then sends no more requests there. Its in-flight requests fail through the engine.
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

// One replica's executor and the size of its KV pool (the scheduler's num_blocks).
struct replica_executor {
  std::unique_ptr<engine::executor> exec;
  int32_t num_blocks = 0;
  std::shared_ptr<replica_health> health; // null: never marked failed (in-process executors)
};

class replica_router final : public serving_port {
 public:
  // `options`: the scheduler options of every replica but num_blocks (each replica's own).
  replica_router(std::string deployment, size_t replicas, engine::scheduler_options options);
  ~replica_router(); // stops every replica's engine

  size_t replicas() const { return slots_.size(); }
  // Starts replica i's engine over `r`; a previous engine of replica i is stopped (its live
  // requests end as cancelled). Errors as the scheduler options' validation.
  expected<void> install(size_t i, replica_executor r);
  // Replica i no longer serves: new requests go to the others (or get `why` with 503); its
  // engine is stopped (its live requests end as failed).
  void take_down(size_t i, const std::string& why);

  expected<seq_id> submit(engine::request r, std::shared_ptr<request_sink> sink) override;
  void cancel(seq_id id) override;
  // serving_engine's metrics summed over the replicas, plus per replica: whether it serves
  // (troupe_replica_up) and the requests it took (troupe_replica_requests_total).
  std::string metrics_text(const serve_metrics& m, const std::string& model) const override;
  int32_t kv_blocks_in_use() const;

 private:
  // A replica's engine and its executor (the engine refers to it, so it stops first).
  struct unit {
    replica_executor r;
    std::unique_ptr<serving_engine> engine;
    ~unit() { engine.reset(); }
  };
  struct slot {
    std::shared_ptr<unit> u;
    std::string down; // why it does not serve (u empty, or its health failed)
    int32_t submitting = 0;
    uint64_t submitted = 0;
  };
  struct live_request {
    size_t slot = 0;
    std::weak_ptr<unit> owner;
    seq_id local = 0;
    std::weak_ptr<request_sink> sink; // expires once the engine and the session let go
  };
  bool serving(const slot& s) const;
  void prune();                // under mu_: forgets finished requests
  size_t load(size_t i) const; // under mu_: unfinished requests of replica i

  const std::string deployment_;
  const engine::scheduler_options options_;
  mutable std::mutex mu_;
  std::vector<slot> slots_;
  std::map<seq_id, live_request> live_;
  seq_id next_id_ = 1;
  size_t next_turn_ = 0;
};

} // namespace troupe::serve
