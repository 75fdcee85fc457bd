// The router between the replicas of one deployment (design.md §1, §3 step 2): each replica is a
// replica_actor over its own executor (in-process) or worker ranks; submit() sends a request to
// the healthy replica with the fewest unfinished requests (ties in turn) as a message, cancel()
// to the replica that took it, /metrics sums the replicas' published gauges. The HTTP sessions
// call it (serving_port); the deployment installs each replica, and through it the serving
// actor takes a failed replica out (take_down) and swaps a restarted one in (install). With no
// replica serving, submit() fails at once with errc::unavailable (HTTP 503) saying why.
// Thread-safe; nothing here blocks beyond a short lock.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>

#include "actors/serving/prefix_affinity.hpp"
#include "actors/serving/replica_actor.hpp"
#include "http/serving_port.hpp"

namespace troupe::serve {

// One replica's executor: in-process (`exec`) or worker ranks (`ranks`), and the size of its KV
// pool (the scheduler's num_blocks).
struct replica_executor {
  std::shared_ptr<engine::executor> exec;
  int32_t num_blocks = 0;
  std::shared_ptr<replica_health> health; // null: a fresh one
  worker_ranks ranks;                     // when exec is null
  int32_t block_size = 0;                 // 0: the router's options'
  // A disaggregated deployment's replica: its part in the handoffs (handoff.hpp).
  std::shared_ptr<prefill_role> prefill;
  std::shared_ptr<decode_role> decode;
};

class replica_router final : public serving_port {
 public:
  // `options`: the scheduler options of every replica but num_blocks (each replica's own).
  replica_router(caf::actor_system& sys, std::string deployment, size_t replicas,
                 engine::scheduler_options options);
  ~replica_router(); // stops every replica's actor (their live requests end as cancelled)

  size_t replicas() const { return slots_.size(); }
  // Starts replica i's actor over `r`; a previous replica i is stopped (its live requests end
  // as cancelled). Errors as the scheduler options' validation.
  expected<void> install(size_t i, replica_executor r);
  // Disaggregated deployments: the replicas above decode; these prefill for them. With any
  // installed, a request goes to the least loaded decode replica, which has it prefilled by the
  // least loaded prefill replica (or prefills itself while none serves). `stats`: the handoffs'
  // counters for /metrics.
  expected<void> install_prefill(size_t i, replica_executor r);
  // Replica i no longer serves: new requests go to the others (or get `why` with 503); its
  // actor is stopped (its live requests end as cancelled).
  void take_down(size_t i, const std::string& why);
  // Prefill replica i no longer serves: requests are prefilled by the others (or on their
  // decode replica while none serves).
  void take_down_prefill(size_t i, const std::string& why);

  // Returns at once: the request goes to the chosen replica as a message; what it finds wrong
  // (invalid for the scheduler, queue full) reaches sink->fail().
  expected<seq_id> submit(engine::request r, std::shared_ptr<request_sink> sink) override;
  // n > 1: the choices go to one replica together (one lane there), so that they share the
  // prompt's KV blocks; a disaggregated deployment hands each off on its own.
  expected<std::vector<seq_id>>
  submit_choices(std::vector<engine::request> rs,
                 std::vector<std::shared_ptr<request_sink>> sinks) override;
  void cancel(seq_id id) override;
  // The replicas' gauges summed, plus per replica: whether it serves (troupe_replica_up) and
  // the requests it took (troupe_replica_requests_total).
  std::string metrics_text(const serve_metrics& m, const std::string& model) const override;
  engine_gauges gauges() const override;
  int32_t kv_blocks_in_use() const;

 private:
  // A replica's actor and what the router reads of it; the actor stops with the unit.
  struct unit {
    caf::actor actor;
    std::shared_ptr<replica_health> health;
    std::shared_ptr<replica_gauges> gauges;
    ~unit();
  };
  struct slot {
    std::shared_ptr<unit> u;
    std::string down; // why it does not serve (u empty, or its health failed)
    uint64_t submitted = 0;
  };
  struct live_request {
    size_t slot = 0;
    std::weak_ptr<unit> owner;
    std::weak_ptr<request_sink> sink; // expires once the replica and the session let go
  };
  bool serving(const slot& s) const;
  std::shared_ptr<unit> make_unit(replica_executor r, engine::scheduler_options options,
                                  expected<void>& ok);
  // Under mu_: the least loaded serving prefill replica (by its gauges, ties in turn), or the
  // one holding the prompt's longest prefix when it is not much busier; prefill_slots_.size()
  // for none.
  size_t pick_prefill(std::span<const token_id> prompt);
  expected<size_t> pick_replica(std::span<const token_id> prompt, size_t n); // under mu_
  void prune();                // under mu_: forgets finished requests
  size_t load(size_t i) const; // under mu_: unfinished requests of replica i

  caf::actor_system& sys_;
  const std::string deployment_;
  const engine::scheduler_options options_;
  mutable std::mutex mu_;
  std::vector<slot> slots_;
  std::vector<slot> prefill_slots_;
  std::shared_ptr<handoff_stats> handoff_stats_;
  std::map<seq_id, live_request> live_;
  prefix_affinity affinity_, prefill_affinity_; // which replica took which prompt prefixes
  seq_id next_id_ = 1;
  size_t next_turn_ = 0, next_prefill_turn_ = 0;
};

} // namespace troupe::serve
