#include "actors/remote_executor.hpp"

#include <caf/after.hpp>
#include <caf/system_messages.hpp>

#include "runtime/log.hpp"
#include "runtime/messages.hpp"

namespace troupe::actors {

using ms = std::chrono::milliseconds;

remote_executor::remote_executor(caf::actor_system& sys, std::vector<caf::actor> workers,
                                 size_t answer_rank, ms timeout,
                                 std::function<void(const std::string&)> on_failure)
  : sys_(sys), workers_(std::move(workers)), answer_rank_(answer_rank), timeout_(timeout),
    on_failure_(std::move(on_failure)) {}

remote_executor::~remote_executor() = default;

expected<step_result> remote_executor::fail(std::string why) {
  if (broken_.empty()) {
    broken_ = std::move(why);
    log::error("remote executor: {}", broken_);
    if (on_failure_)
      on_failure_(broken_);
  }
  return make_error(errc::unavailable, "{}", broken_);
}

expected<step_result> remote_executor::execute(const step_plan& plan) {
  if (!broken_.empty())
    return make_error(errc::unavailable, "{}", broken_);
  if (!self_) {
    self_ = std::make_unique<caf::scoped_actor>(sys_);
    for (const auto& w : workers_)
      (*self_)->monitor(w);
  }
  auto& self = *self_;
  for (const auto& w : workers_)
    self->send(w, msg::execute_atom::value, plan);
  std::vector<bool> answered(workers_.size(), false);
  size_t got = 0;
  step_result out;
  std::string err;
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  while (got < workers_.size() && err.empty()) {
    auto left = std::chrono::duration_cast<ms>(deadline - std::chrono::steady_clock::now());
    self->receive(
        [&](msg::worker_reply& r) {
          auto rank = static_cast<size_t>(r.rank);
          if (r.step != plan.step || rank >= answered.size() || answered[rank])
            return; // a late answer to an earlier step
          answered[rank] = true;
          ++got;
          if (!r.error.empty())
            err = fmt::format("rank {} failed step {}: {}", rank, plan.step, r.error);
          else if (rank == answer_rank_)
            out = std::move(r.result);
        },
        [&](caf::down_msg& dm) {
          for (size_t i = 0; i < workers_.size(); ++i)
            if (workers_[i].address() == dm.source)
              err = fmt::format("rank {} is gone ({})", i, sys_.render(dm.reason));
          if (err.empty())
            err = "a worker is gone (" + sys_.render(dm.reason) + ")";
        },
        caf::after(std::max(left, ms(1))) >> [&] {
          err = fmt::format("{} of {} ranks did not answer step {} within {} ms",
                            workers_.size() - got, workers_.size(), plan.step, timeout_.count());
        });
  }
  if (!err.empty())
    return fail("deployment worker failure: " + err);
  return out;
}

} // namespace troupe::actors
