#include "engine/exec/lockstep_executor.hpp"

#include <array>
#include <thread>

#include "runtime/log.hpp"

namespace troupe::engine {

lockstep_executor::lockstep_executor(std::unique_ptr<executor> inner, backend& model,
                                     comm::communicator& group, std::chrono::microseconds poll)
  : inner_(std::move(inner)), model_(model), group_(group), poll_(poll) {}

expected<step_result> lockstep_executor::round(const step_plan* plan, const mask_fill* fill) {
  const int32_t mine = plan != nullptr ? plan->num_tokens() : 0;
  // [tokens brought, ranks still in]: float sums are exact far beyond any step's token count.
  std::array<float, 2> agree{static_cast<float>(mine), left_ ? 0.0f : 1.0f};
  if (auto r = group_.all_reduce_sum(agree); !r) {
    done_ = true;
    return std::move(r).error().context("agreeing on a data-parallel step");
  }
  ++rounds_;
  const bool forward = agree[0] > 0.0f;
  last_used_ = forward;
  if (!forward && agree[1] == 0.0f)
    done_ = true; // every rank has left, and nobody brought work
  if (mine > 0)
    return fill != nullptr ? inner_->execute_filling(*plan, *fill) : inner_->execute(*plan);
  // Nothing of ours to compute; the inner executor still sees an empty plan (it drops the state
  // of finished sequences), and the group's pass needs this rank's collectives.
  step_result result{.step = plan != nullptr ? plan->step : 0};
  if (plan != nullptr)
    TROUPE_ASSIGN(result, inner_->execute(*plan));
  if (forward)
    TROUPE_TRY_VOID(model_.forward(step_plan{}, empty_out_));
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
  if (done_)
    return false;
  if (!last_used_) // nobody worked last round: wait a little before asking again
    std::this_thread::sleep_for(poll_);
  if (auto r = round(nullptr, nullptr); !r) {
    log::warn("data-parallel group: {}", r.error().to_string());
    return false;
  }
  return !done_;
}

} // namespace troupe::engine
