#include "engine/scheduler/engine_loop.hpp"

namespace troupe::engine {

expected<std::vector<request_output>> engine_loop::step() {
  std::vector<request_output> out;
  if (failed_)
    return make_error(errc::unavailable, "a step failed; call fail_all() before stepping again");
  scheduler_.schedule(plan_);
  if (plan_.seqs.empty() && plan_.finished.empty()) {
    scheduler_.take_pending(out);
    return out;
  }
  auto result = exec_.execute(plan_);
  if (!result) {
    failed_ = true;
    return std::move(result).error().context(fmt::format("step {}", plan_.step));
  }
  if (auto u = scheduler_.update(plan_, *result, out); !u) {
    failed_ = true;
    return std::move(u).error();
  }
  return out;
}

std::vector<request_output> engine_loop::fail_all() {
  std::vector<request_output> out;
  for (seq_id id : scheduler_.unfinished())
    (void)scheduler_.cancel(id);
  scheduler_.take_pending(out);
  failed_ = false;
  return out;
}

} // namespace troupe::engine
