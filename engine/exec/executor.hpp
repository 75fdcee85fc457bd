// Runs step plans: the one seam between the scheduler and whatever computes. local_executor
// (backend + sampler in this process) and cuda_executor (GPU) implement it; a cluster
// deployment's replica actor sends plans to its worker actors instead (actors/serving).
#pragma once

#include <deque>
#include <functional>
#include <unordered_map>

#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

class executor {
 public:
  virtual ~executor() = default;
  // Runs `plan` and returns one seq_output per seq_step that asked for logits, in plan order.
  // Blocks the calling thread until the step is done. The plan holds no previous_sample (run()
  // puts those in).
  virtual expected<step_result> execute(const step_plan& plan) = 0;

  // Structured output: writes the plan's grammar masks (seq_step::allowed_tokens) in place; the
  // plan is the caller's, passed as const only so the executor does not change it otherwise.
  using mask_fill = std::function<void()>;
  // execute(), calling `fill` (when set) once before the masks are read, as late as is useful:
  // cuda_executor calls it once the forward pass is queued on the GPU, so the masks are
  // computed while the GPU runs. The default calls it first.
  virtual expected<step_result> execute_filling(const step_plan& plan, const mask_fill& fill) {
    if (fill)
      fill();
    return execute(plan);
  }

  // What callers use: puts in the plan's previous_sample tokens, each the token this executor
  // sampled for that sequence in the plan before (an error if it sampled none), then
  // execute_filling(), and remembers what it sampled. Every rank that feeds tokens samples
  // (the same token, from the same seed), so each can do this for itself.
  expected<step_result> run(step_plan& plan, const mask_fill& fill = {});

  // Pipelined use (engine_loop): how many plans this executor can usefully work on at once.
  // A pipeline of P stages keeps P plans in flight, one per stage, so no stage idles.
  virtual int32_t depth() const { return 1; }
  // Runs a submitted plan while the caller goes on (on a thread of its own), so that at depth
  // 1 engine_loop makes the next plan, ahead, while this one runs.
  virtual bool overlaps() const { return false; }
  // Starts `plan`; the caller keeps it alive and unchanged (but for `fill` and the executor's
  // previous_sample tokens) until its result is collected. Results come back in submission
  // order. The default runs the plan now.
  virtual expected<void> submit(step_plan& plan, const mask_fill& fill = {}) {
    done_.push_back(run(plan, fill));
    return {};
  }
  // A plan made ahead that samples under a grammar, whose masks depend on the plan before
  // (engine_loop, over an executor that overlaps): submit_unmasked() starts it without masks;
  // the caller writes them once the plan before is done and calls masks_filled(plan), and the
  // executor samples it only after that. Only executors that overlap support it.
  virtual expected<void> submit_unmasked(step_plan&) {
    return make_error(errc::unsupported, "this executor runs a plan when it is submitted");
  }
  virtual void masks_filled(const step_plan&) {}
  // run() on the caller's thread, nothing being in flight: for a plan that nothing will be
  // planned ahead of, where an executor that overlaps would only add hand-offs.
  virtual expected<step_result> run_here(step_plan& plan, const mask_fill& fill) {
    return run(plan, fill);
  }
  // Work worth doing while no plan waits (cuda_executor: warming up the next decode batch
  // bucket); returns whether more remains. threaded_executor calls it on its thread.
  virtual bool idle_work() { return false; }
  // The result of the oldest submitted plan not yet collected; blocks until it is done.
  virtual expected<step_result> collect() {
    if (done_.empty())
      return make_error(errc::internal, "collect: no plan was submitted");
    auto r = std::move(done_.front());
    done_.pop_front();
    return r;
  }

 private:
  std::deque<expected<step_result>> done_;
  std::unordered_map<seq_id, token_id> sampled_; // by run(): each sequence's last sampled token
};

} // namespace troupe::engine
