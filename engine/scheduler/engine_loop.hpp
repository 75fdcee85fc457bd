// The engine's policy loop: schedulers whose plans an executor runs. Two ways to drive it: the
// replica actor calls plan() and, as each result arrives, complete(); tests, offline tools and
// in-process executors call step(), which does both and blocks for the executor.
//
// Pipelining: an executor of depth P (a pipeline of P stages) gets P lanes, each its own
// scheduler over a 1/P slice of the KV pool, and one plan per lane in flight, so each stage
// works on a different micro-batch and none idles (vLLM's "virtual engines" for pipeline
// parallelism). A request stays in the lane that admitted it (the least loaded). Lanes are
// fewer when a slice could not hold one full context (max_model_len).
//
// Planning ahead (depth 1, an executor that overlaps, or worker ranks): one lane with up to two
// plans in flight; step n+1 is scheduled while step n runs (scheduler::can_plan_ahead), so the
// device goes from one step to the next without waiting for scheduling or output delivery. Over
// an executor that overlaps, also past grammar rows: step n+1 goes out without its masks, which
// are filled once step n is updated (executor::submit_unmasked), while step n+1's forward runs.
//
// Only step() blocks (for the executor). One thread at a time.
#pragma once

#include <array>
#include <deque>
#include <memory>
#include <vector>

#include "engine/exec/executor.hpp"
#include "engine/scheduler/scheduler.hpp"

namespace troupe::engine {

// KV pool and prefix-cache figures summed over lanes, for metrics.
struct pool_usage {
  int32_t num_blocks = 0, blocks_used = 0;
  uint64_t lookups = 0, hits = 0;
  double hit_rate() const { return lookups ? static_cast<double>(hits) / lookups : 0.0; }
  pool_usage& operator+=(const pool_usage& o) {
    num_blocks += o.num_blocks;
    blocks_used += o.blocks_used;
    lookups += o.lookups;
    hits += o.hits;
    return *this;
  }
};

class engine_loop {
 public:
  // step() runs plans on `exec`, whose depth gives the lanes; planning ahead if it overlaps.
  engine_loop(scheduler_options options, executor& exec);
  // plan()/complete() only: the caller runs the plans, `depth` lanes, at depth 1 up to two plans
  // with `plan_ahead` (every rank that feeds tokens samples: executor::run).
  engine_loop(scheduler_options options, int32_t depth, bool plan_ahead = false);

  // Queues a request in the least loaded lane (see scheduler::add for the errors).
  expected<seq_id> add_request(request r);
  // The choices of one prompt (scheduler::add_group), all in the least loaded lane so that they
  // share the prompt's KV blocks.
  expected<std::vector<seq_id>> add_group(std::vector<request> rs);
  expected<void> cancel(seq_id id);

  // Schedules every lane that has work and room for a plan; returns the plans started, in
  // order, which the caller runs (each lane's in order) and hands back to complete(). Plans of
  // different lanes never share a sequence or a block; a lane's plan made ahead may. Idle lanes'
  // pending cancellations go to `out`. Errors once a step failed.
  struct started {
    size_t lane = 0;
    const step_plan* plan = nullptr; // valid until its complete()
  };
  expected<std::vector<started>> plan(std::vector<request_output>& out);
  // The result of lane `lane`'s oldest plan (in any order across lanes): its requests' deltas go
  // to `out`. An error (a bug) fails the engine as step() does.
  expected<void> complete(size_t lane, const step_result& result, std::vector<request_output>& out);

  // Submits a plan for every idle lane that has work, then waits for the oldest plan in flight
  // and returns its requests' deltas (new token, logprobs, finish) with any pending
  // cancellations. Returns only pending cancellations when nothing is in flight. An executor
  // error is returned with the step number; the engine then refuses to step until fail_all()
  // has ended the requests (their KV state is unknown).
  expected<std::vector<request_output>> step();

  // Ends every request as cancelled (e.g. after an executor failure), dropping the results of
  // plans still in flight; returns the outputs.
  std::vector<request_output> fail_all();

  bool has_unfinished() const;
  // A plan is in flight, or one would advance something (see scheduler::has_work).
  bool has_work() const;

  // Prefill/decode disaggregation, per request (scheduler has the meaning of each).
  void take_reservations(std::vector<kv_reservation>& out);
  expected<void> finish_import(seq_id id, const seq_output& first,
                               std::vector<request_output>& out) {
    return lane_of(id).sched.finish_import(id, first, out);
  }
  expected<void> prefill_locally(seq_id id) { return lane_of(id).sched.prefill_locally(id); }
  expected<void> release_held(seq_id id) { return lane_of(id).sched.release_held(id); }
  size_t num_lanes() const { return lanes_.size(); }
  size_t in_flight() const { return in_flight_.size(); }
  const scheduler& sched(size_t lane = 0) const { return lanes_.at(lane)->sched; }
  scheduler_stats stats() const; // summed over lanes
  pool_usage usage() const;

 private:
  struct lane {
    explicit lane(scheduler_options o) : sched(std::move(o)) {}
    scheduler sched;
    std::array<step_plan, 2> plans; // a ring: `busy` plans in flight from plans[first]
    size_t first = 0, busy = 0;
    const step_plan* unmasked = nullptr; // in flight, its masks to fill when it is the oldest
    step_plan& at(size_t k) { return plans[(first + k) % plans.size()]; }
  };
  lane& least_loaded();
  lane& lane_of(seq_id id) { return *lanes_[(id - 1) % lanes_.size()]; }
  bool start(size_t i, std::vector<request_output>& out); // schedules lane i if it may
  void finish_oldest(lane& l);
  void fill_unmasked(lane& l, bool fill); // the oldest plan's masks, if it went out without
  error drop_newest(lane& l, error why);  // it never ran: the engine fails
  // Grammar rows planned ahead too: only over an executor (worker ranks get masks in the plan).
  bool masks_later() const { return plan_ahead_ && exec_ != nullptr; }

  std::vector<std::unique_ptr<lane>> lanes_;
  bool plan_ahead_ = false;
  std::deque<size_t> in_flight_; // lane indices, oldest first (the executor's order)
  executor* exec_ = nullptr;     // step() only
  bool failed_ = false;
};

} // namespace troupe::engine
