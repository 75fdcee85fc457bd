#include "engine/exec/threaded_executor.hpp"

#include <chrono>

#include "runtime/log.hpp"

namespace troupe::engine {

threaded_executor::threaded_executor(std::unique_ptr<executor> inner,
                                     std::unique_ptr<backend> model)
  : model_(std::move(model)), inner_(std::move(inner)), thread_([this] { loop(); }) {}

threaded_executor::~threaded_executor() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void threaded_executor::loop() {
  std::unique_lock lock(mu_);
  bool idle_work = true; // the inner executor may have some
  for (;;) {
    job* j = nullptr;
    const auto ready = [&] {
      for (auto& q : jobs_)
        if (!q.started) {
          j = &q;
          return true;
        }
      return stop_;
    };
    cv_.wait(lock, [&] { return ready() || (idle_work && !held_); });
    if (!j && !stop_) { // nothing waits: the inner executor's idle work, one piece
      idling_ = true;
      lock.unlock();
      idle_work = inner_->idle_work();
      lock.lock();
      idling_ = false;
      cv_.notify_all();
      continue;
    }
    if (!j)
      return; // stopping, and every submitted plan ran
    j->started = true;
    mask_fill wait_for_masks;
    if (j->fills)
      wait_for_masks = [this, j] {
        std::unique_lock l(mu_);
        cv_.wait(l, [this, j] { return j->filled || stop_; });
      };
    lock.unlock();
    const auto t0 = std::chrono::steady_clock::now();
    auto r = inner_->run(*j->plan, wait_for_masks);
    log::debug(
        "executor: step {} ran in {:.0f} us", j->plan->step,
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    lock.lock();
    j->result = std::move(r);
    cv_.notify_all();
  }
}

template <class F>
expected<step_result> threaded_executor::on_this_thread(const char* what, F&& f) {
  {
    std::unique_lock lock(mu_);
    if (!jobs_.empty())
      return make_error(errc::internal, "{}: plans are in flight on the executor thread", what);
    held_ = true; // no idle work starts, and the piece running ends first
    cv_.wait(lock, [this] { return !idling_; });
  }
  auto r = f(); // the thread is idle: the inner executor is this thread's
  {
    std::lock_guard lock(mu_);
    held_ = false;
  }
  cv_.notify_all();
  return r;
}

expected<step_result> threaded_executor::execute(const step_plan& plan) {
  return on_this_thread("execute", [&] { return inner_->execute(plan); });
}

expected<step_result> threaded_executor::run_here(step_plan& plan, const mask_fill& fill) {
  return on_this_thread("run_here", [&] { return inner_->run(plan, fill); });
}

expected<void> threaded_executor::submit_unmasked(step_plan& plan) {
  {
    std::lock_guard lock(mu_);
    jobs_.push_back(job{.plan = &plan, .fills = true});
  }
  cv_.notify_all();
  return {};
}

void threaded_executor::masks_filled(const step_plan& plan) {
  {
    std::lock_guard lock(mu_);
    for (auto& j : jobs_)
      if (j.plan == &plan)
        j.filled = true;
  }
  cv_.notify_all();
}

expected<void> threaded_executor::submit(step_plan& plan, const mask_fill& fill) {
  job* j = nullptr;
  {
    std::lock_guard lock(mu_);
    j = &jobs_.emplace_back(job{.plan = &plan, .fills = static_cast<bool>(fill)});
  }
  cv_.notify_all();
  if (fill) { // while the thread runs the forward pass
    fill();
    {
      std::lock_guard lock(mu_);
      j->filled = true;
    }
    cv_.notify_all();
  }
  return {};
}

expected<step_result> threaded_executor::collect() {
  std::unique_lock lock(mu_);
  if (jobs_.empty())
    return make_error(errc::internal, "collect: no plan was submitted");
  cv_.wait(lock, [&] { return jobs_.front().result.has_value(); });
  auto r = std::move(*jobs_.front().result);
  jobs_.pop_front();
  return r;
}

} // namespace troupe::engine
