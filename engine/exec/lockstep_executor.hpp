// The ranks of a data-parallel attention group whose MoE layers exchange token rows by all-to-all
// (cpu_backend with parallel_context::experts) must run their forward passes together: each pass
// is a sequence of collectives that every rank of the group joins. A lockstep_executor per rank
// makes that so while each rank schedules its own requests. Work happens in rounds: every rank
// says, by an all-reduce over the group, how many tokens it brings and whether it is still in;
// when any rank brings tokens, every rank runs one forward pass, those without a plan an empty
// one. execute() is a round with this rank's plan; idle_work() is a round without one, so that a
// threaded_executor around it keeps the rank answering while it has no requests (pausing `poll`
// after a round that nobody used). After leave(), idle rounds go on until every rank has left
// (done()); the destructor leaves and runs the rounds still needed itself. A plan the backend
// would refuse is refused before the round (the rank brings nothing, and still joins the pass);
// a pass that fails breaks the group: this and every later call fail at once (failed()), and the
// other ranks' collectives end at the communicator's timeout. Calls must not overlap (one at a
// time, from any thread: threaded_executor guarantees it).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>

#include "engine/backend/backend.hpp"
#include "engine/comm/communicator.hpp"
#include "engine/exec/executor.hpp"

namespace troupe::engine {

class lockstep_executor final : public executor {
 public:
  // `inner` runs this rank's plans on `model`; `group` is the one the model's MoE layers use.
  lockstep_executor(std::unique_ptr<executor> inner, backend& model, comm::communicator& group,
                    std::chrono::microseconds poll = std::chrono::microseconds(500));
  ~lockstep_executor() override; // leaves, and joins rounds until every rank has

  expected<step_result> execute(const step_plan& plan) override;
  expected<step_result> execute_filling(const step_plan& plan, const mask_fill& fill) override;
  int32_t depth() const override { return inner_->depth(); }
  bool idle_work() override;

  // This rank has no more requests; idle rounds go on until every rank has left.
  void leave() { left_ = true; }
  bool done() const { return done_; }         // every rank has left (a round said so)
  bool failed() const { return failed_; }     // a round failed: the group is broken
  uint64_t passes() const { return passes_; } // forward passes run, empty ones included

 private:
  // One round: agree with the group, then (if anyone brings tokens) run `plan` through the inner
  // executor, or an empty forward pass when this rank brings none.
  expected<step_result> round(const step_plan* plan, const mask_fill* fill);
  expected<step_result> broken() const;

  std::unique_ptr<executor> inner_;
  backend& model_;
  comm::communicator& group_;
  std::chrono::microseconds poll_;
  std::atomic<bool> left_{false}, done_{false}, failed_{false};
  std::atomic<uint64_t> passes_{0};
  bool last_used_ = true; // the previous round ran a pass (no pause before the next)
  forward_output empty_out_;
};

} // namespace troupe::engine
