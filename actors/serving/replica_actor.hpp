// replica_actor: one replica's engine (design.md §3), spawned by replica_router. It owns the
// replica's engine_loop, takes requests and cancels as messages (the sender never waits), runs
// plans, and hands each request's outputs to its sink. Two kinds:
//   in-process executor: detached; one (step_atom) message per step, so submits and cancels
//     that arrived meanwhile are taken between steps; a step waits for the oldest plan in
//     flight (an executor that overlaps, threaded_executor, runs the next one meanwhile);
//   worker ranks: event-based, never blocks; (execute_atom, ticket, plan) to every rank, one
//     plan per pipeline stage in flight, two at one stage (the next made ahead), replies
//     gathered by ticket (worker_group). A rank that fails, goes down, or leaves a plan
//     unanswered past the timeout fails the replica: every request fails through its sink, the
//     health is marked, `on_failure` is told once.
//   (submit_atom, msg::replica_job)  router -> replica; errors (invalid, queue full) to the sink
//   (cancel_atom, seq_id)            router -> replica, the router's id; frees the KV blocks
// Stopping it (an exit message) fails its live requests with errc::cancelled.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/messages.hpp"
#include "actors/serving/handoff.hpp"
#include "actors/serving/replica_status.hpp"
#include "actors/serving/worker_group.hpp"
#include "engine/exec/executor.hpp"
#include "engine/scheduler/engine_loop.hpp"

namespace troupe::serve {

// A replica's worker ranks (world rank order) and how to drive them.
struct worker_ranks {
  std::vector<caf::actor> workers;
  size_t answer_rank = 0;               // the last stage's tensor rank 0: it samples
  std::chrono::milliseconds timeout{0}; // a plan's replies, from its sending
  int32_t stages = 1; // pipeline stages: a lane each; at one, plans are made ahead
  std::function<void(const std::string&)> on_failure; // told once, on the replica's thread
};

struct replica_spec {
  engine::scheduler_options options;      // num_blocks: this replica's pool
  std::shared_ptr<engine::executor> exec; // in-process; null: `ranks`
  worker_ranks ranks;
  std::shared_ptr<replica_health> health; // marked failed when the ranks fail
  std::shared_ptr<replica_gauges> gauges; // published after every step
  // Disaggregated deployments (handoff.hpp): at most one of them.
  std::shared_ptr<prefill_role> prefill;
  std::shared_ptr<decode_role> decode;
};

struct replica_state {
  struct live_request {
    seq_id router_id = 0;
    std::shared_ptr<request_sink> sink;
  };
  replica_spec spec;
  std::unique_ptr<engine::engine_loop> loop;
  std::unordered_map<seq_id, seq_id> local_of;   // router id -> engine id
  std::unordered_map<seq_id, live_request> live; // engine id -> its request
  std::unique_ptr<worker_group> group;           // worker ranks only
  std::map<uint64_t, size_t> lane_of;            // ticket -> engine lane
  bool step_queued = false;                      // in-process: a step_atom is in the mailbox
  std::string broken;                            // why the ranks failed
  // Decode side: requests whose KV comes from a prefill replica, by engine id.
  struct pending_import {
    uint64_t lease = 0; // lease_of(router id, attempt)
    uint32_t attempt = 0;
    caf::actor prefill;                // this attempt's prefill replica
    std::vector<caf::actor> fallbacks; // the ones to try next, in turn
    engine::request request;           // what the prefill replica gets (export_kv)
    std::vector<int32_t> blocks;       // the reservation (kept for a retry)
    std::vector<int32_t> landing;      // staged: its landing blocks, by position / block_size
    size_t unstaging = 0;              // staged: decode ranks still copying it into the cache
    bool unstaged = false;             // staged: it is in the cache
    troupe::error unstage_failure;     // staged: the first rank's error
    std::optional<seq_output> first;   // handed over
    bool landed = false;               // every batch's completion notice arrived
    uint32_t notices = 0;              // of them, arrived
    bool sent = false;                 // the export job went out
    bool cancelled = false; // the client left: blocks held until the prefill side answers
    bool aborted = false;   // past the deadline: the prefill side was told to stop
    std::chrono::steady_clock::time_point sent_at; // the export job went out
    uint64_t bytes = 0;                            // what the transfer moved
    int32_t cached_tokens = 0;                     // prompt positions not sent (prefix cache)
  };
  std::unordered_map<seq_id, pending_import> imports;
  std::unordered_map<uint64_t, seq_id> import_of; // lease -> engine id
  std::vector<int32_t> landing_free;              // staged: free landing blocks
  std::deque<seq_id> landing_wait; // reserved imports waiting to be sent, in order (staged: for
                                   // landing blocks)
  std::vector<std::unique_ptr<notice_listener>> listeners;
  // Prefill side: export jobs by engine id.
  struct pending_export {
    export_job job;
    seq_output first;
    // Pushes are armed when the export enters the scheduler and run while the prompt's last
    // step does: the replica's pusher (in one process) or its worker ranks'.
    size_t awaiting = 0;    // pushing ranks yet to answer
    bool prefilled = false; // the prefill ended (first token, or a failure)
    push_result pushed;     // their answers summed, the first failure
  };
  std::unordered_map<seq_id, pending_export> exports;
  std::unordered_map<uint64_t, seq_id> export_of; // lease -> engine id
  ~replica_state();                               // fails the live requests (cancelled)
  static inline const char* name = "replica_actor";
};

caf::behavior replica_actor(caf::stateful_actor<replica_state>* self, replica_spec spec);

// Spawns a replica actor: detached over an in-process executor, event-based over worker ranks.
// The options must be valid (engine::validate).
caf::actor spawn_replica(caf::actor_system& sys, replica_spec spec);

} // namespace troupe::serve
