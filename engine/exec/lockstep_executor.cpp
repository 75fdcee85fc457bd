#include "engine/exec/lockstep_executor.hpp"

#include <array>
#include <thread>

#include "runtime/log.hpp"

namespace troupe::engine {

lockstep_executor::lockstep_executor(std::unique_ptr<executor> inner, backend& model,
                                     comm::communicator& group, std::chrono::microseconds poll)
  : inner_(std::move(inner)), model_(model), group_(group), poll_(poll) {}

lockstep_executor::~lockstep_executor() {
  // Rounds until every rank has left; a rank gone without leaving ends them at the
  // communicator's timeout.
  leave();
  while (!done_ && !failed_)
    if (!round(nullptr, nullptr))
      break;
}

expected<step_result> lockstep_executor::broken() const {
  return make_error(errc::unavailable, "data-parallel group: {}",
                    failed_ ? "a pass failed, the group is broken" : "every rank has left");
}

expected<step_result> lockstep_executor::round(const step_plan* plan, const mask_fill* fill) {
  if (failed_ || done_)
    return broken();
  // A plan the backend would refuse brings nothing: this rank still joins the others' pass.
  expected<void> valid{};
  if (plan != nullptr && !plan->seqs.empty())
    valid = validate_plan(*plan, model_.config(), model_.kv_options());
  const int32_t mine = plan != nullptr && valid ? plan->num_tokens() : 0;
  // [tokens brought, ranks still in]: float sums are exact far beyond any step's token count.
  std::array<float, 2> agree{static_cast<float>(mine), left_ ? 0.0f : 1.0f};
  if (auto r = group_.all_reduce_sum(agree); !r) {
    failed_ = true;
    return std::move(r).error().context("data-parallel group: agreeing on a pass");
  }
  const bool pass = agree[0] > 0.0f;
  last_used_ = pass;
  if (!pass && agree[1] == 0.0f)
    done_ = true; // every rank has left, and nobody brought work
  if (pass)
    ++passes_;
  auto run_inner = [&] {
    return fill != nullptr ? inner_->execute_filling(*plan, *fill) : inner_->execute(*plan);
  };
  expected<step_result> result = step_result{.step = plan != nullptr ? plan->step : 0};
  if (mine > 0) {
    result = run_inner();
  } else {
    if (pass) // the group's pass needs this rank's collectives
      if (auto f = model_.forward(step_plan{}, empty_out_); !f)
        result = std::move(f).error().context("data-parallel group: this rank's empty pass");
    if (result && plan != nullptr && valid) // a plan of no tokens: finished sequences dropped
      result = run_inner();
  }
  if (!result)
    failed_ = true; // the others' collectives in this pass may be left waiting
  if (!valid)       // refused before the round: the group is fine
    return std::move(valid).error();
  return result;
}

expected<step_result> lockstep_executor::execute(const step_plan& plan) {
  return round(&plan, nullptr);
}

expected<step_result> lockstep_executor::execute_filling(const step_plan& plan,
                                                         const mask_fill& fill) {
  return round(&plan, &fill);
}

bool lockstep_executor::idle_work() {
  if (done_ || failed_)
    return false;
  if (!last_used_) // nobody worked last round: wait a little before asking again
    std::this_thread::sleep_for(poll_);
  if (auto r = round(nullptr, nullptr); !r) {
    log::warn("{}", r.error().to_string());
    return false;
  }
  return !done_;
}

} // namespace troupe::engine
