#include "actors/remote_executor.hpp"

#include <caf/after.hpp>
#include <caf/system_messages.hpp>

#include "actors/messages.hpp"
#include "runtime/log.hpp"

namespace troupe::actors {

using ms = std::chrono::milliseconds;

remote_executor::remote_executor(caf::actor_system& sys, std::vector<caf::actor> workers,
                                 size_t answer_rank, ms timeout,
                                 std::function<void(const std::string&)> on_failure, int32_t depth)
  : sys_(sys), workers_(std::move(workers)), answer_rank_(answer_rank), timeout_(timeout),
    on_failure_(std::move(on_failure)), depth_(std::max(depth, 1)) {}

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
  TROUPE_TRY_VOID(submit(plan));
  return collect();
}

expected<void> remote_executor::submit(const step_plan& plan) {
  if (!self_) {
    self_ = std::make_unique<caf::scoped_actor>(sys_);
    for (const auto& w : workers_)
      (*self_)->monitor(w);
  }
  const uint64_t ticket = next_ticket_++;
  in_flight_.push_back(ticket);
  if (!broken_.empty())
    return {}; // collect() reports it
  auto& p = replies_[ticket];
  p.step = plan.step;
  p.answered.assign(workers_.size(), false);
  auto m = caf::make_message(msg::execute_atom::value, ticket, plan); // one copy for all ranks
  for (const auto& w : workers_)
    (*self_)->send(w, m);
  return {};
}

expected<step_result> remote_executor::collect() {
  if (in_flight_.empty())
    return make_error(errc::internal, "collect: no plan was submitted");
  const uint64_t ticket = in_flight_.front();
  in_flight_.pop_front();
  if (!broken_.empty()) {
    replies_.clear();
    return make_error(errc::unavailable, "{}", broken_);
  }
  auto& self = *self_;
  std::string err;
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  auto done = [&] { return replies_[ticket].got == workers_.size(); };
  while (!done() && err.empty()) {
    auto left = std::chrono::duration_cast<ms>(deadline - std::chrono::steady_clock::now());
    self->receive(
        [&](msg::worker_reply& r) {
          auto it = replies_.find(r.ticket);
          auto rank = static_cast<size_t>(r.rank);
          if (it == replies_.end() || rank >= workers_.size() || it->second.answered[rank])
            return; // a late answer to a plan already failed
          auto& p = it->second;
          p.answered[rank] = true;
          ++p.got;
          if (!r.error.empty() && p.error.empty())
            p.error = fmt::format("rank {} failed step {}: {}", rank, p.step, r.error);
          else if (rank == answer_rank_)
            p.result = std::move(r.result);
          if (!p.error.empty() && r.ticket == ticket)
            err = p.error;
        },
        [&](caf::down_msg& dm) {
          for (size_t i = 0; i < workers_.size(); ++i)
            if (workers_[i].address() == dm.source)
              err = fmt::format("rank {} is gone ({})", i, sys_.render(dm.reason));
          if (err.empty())
            err = "a worker is gone (" + sys_.render(dm.reason) + ")";
        },
        caf::after(std::max(left, ms(1))) >>
            [&] {
              const auto& p = replies_[ticket];
              err = fmt::format("{} of {} ranks did not answer step {} within {} ms",
                                workers_.size() - p.got, workers_.size(), p.step, timeout_.count());
            });
  }
  auto node = replies_.extract(ticket);
  if (err.empty())
    err = node.mapped().error;
  if (!err.empty()) {
    replies_.clear();
    return fail("deployment worker failure: " + err);
  }
  return std::move(node.mapped().result);
}

} // namespace troupe::actors
