// An executor on a thread of its own around another: submit() hands the plan over and returns,
// collect() waits for the oldest result. engine_loop then makes the next plan, ahead, while this
// one runs (overlaps()), so the device does not wait for scheduling, output delivery or new
// requests: the in-process counterpart of worker ranks, which run plans in their own processes.
// A plan's grammar masks are filled on the caller's thread, within submit() or, for a plan made
// ahead (submit_unmasked), once the plan before is done (masks_filled), while this thread runs
// the forward pass; the inner executor waits for them before it samples. A plan nothing is
// planned ahead of runs on the caller's thread (run_here). While no plan waits, the thread does
// the inner executor's idle work (CUDA: warming up decode batch sizes), one piece at a time, so
// a plan submitted meanwhile waits for at most one piece.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/backend/backend.hpp"
#include "engine/exec/executor.hpp"

namespace troupe::engine {

class threaded_executor final : public executor {
 public:
  // `model`, when given, is the backend `inner` runs on, kept until after `inner` is gone (an
  // in-process replica's executor owns its model so).
  explicit threaded_executor(std::unique_ptr<executor> inner,
                             std::unique_ptr<backend> model = nullptr);
  ~threaded_executor() override; // finishes the plans submitted, then stops the thread

  // The inner executor on the caller's thread; only while nothing is in flight.
  expected<step_result> execute(const step_plan& plan) override;
  int32_t depth() const override { return inner_->depth(); }
  bool overlaps() const override { return true; }
  expected<void> submit(step_plan& plan, const mask_fill& fill) override;
  expected<step_result> run_here(step_plan& plan, const mask_fill& fill) override;
  expected<void> submit_unmasked(step_plan& plan) override;
  void masks_filled(const step_plan& plan) override;
  expected<step_result> collect() override;

 private:
  struct job {
    step_plan* plan = nullptr;
    bool fills = false;  // masks come from the caller's thread
    bool filled = false; // they are written
    bool started = false;
    std::optional<expected<step_result>> result;
  };
  void loop();
  // f() on the caller's thread, once nothing is in flight and no idle work runs.
  template <class F>
  expected<step_result> on_this_thread(const char* what, F&& f);

  std::unique_ptr<backend> model_; // destroyed after inner_, which refers to it
  std::unique_ptr<executor> inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<job> jobs_; // submitted and not collected, oldest first
  bool stop_ = false;
  bool held_ = false;   // the caller's thread uses the inner executor (on_this_thread)
  bool idling_ = false; // this thread runs the inner executor's idle_work()
  std::thread thread_;
};

} // namespace troupe::engine
