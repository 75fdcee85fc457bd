// The synchronous engine: a scheduler driving an executor, one step per call. The serving actor
// (issue 9) calls step() on each tick; tests and offline tools loop on it. step() blocks for
// the executor; add_request() and cancel() do not. One thread at a time.
#pragma once

#include <vector>

#include "engine/scheduler/executor.hpp"
#include "engine/scheduler/scheduler.hpp"

namespace troupe::engine {

class engine_loop {
 public:
  engine_loop(scheduler_options options, executor& exec)
    : scheduler_(std::move(options)), exec_(exec) {}

  // Queues a request (see scheduler::add for the errors). Stop strings: set
  // request::stop_check from the detokenizer.
  expected<seq_id> add_request(request r) { return scheduler_.add(std::move(r)); }
  expected<void> cancel(seq_id id) { return scheduler_.cancel(id); }

  // Schedules and runs one step; returns every request's delta (new token, logprobs, finish).
  // Returns only pending cancellations when there is nothing to run. An executor error is
  // returned with the step number; the engine then refuses to step until fail_all() has ended
  // the requests (their KV state is unknown).
  expected<std::vector<request_output>> step();

  // Ends every request as cancelled (e.g. after an executor failure); returns their outputs.
  std::vector<request_output> fail_all();

  bool has_unfinished() const { return scheduler_.has_unfinished(); }
  const scheduler& sched() const { return scheduler_; }

 private:
  scheduler scheduler_;
  executor& exec_;
  step_plan plan_;
  bool failed_ = false;
};

} // namespace troupe::engine
