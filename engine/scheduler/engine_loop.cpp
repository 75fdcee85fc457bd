#include "engine/scheduler/engine_loop.hpp"

namespace troupe::engine {

expected<std::vector<request_output>> engine_loop::step() {
  std::vector<request_output> out;
  scheduler_.schedule(plan_);
  if (plan_.seqs.empty() && plan_.finished.empty()) {
    scheduler_.take_pending(out);
    return out;
  }
  auto result = exec_.execute(plan_);
  if (!result)
    return std::move(result).error().context(fmt::format("step {}", plan_.step));
  TROUPE_TRY_VOID(scheduler_.update(plan_, *result, out));
  return out;
}

std::vector<request_output> engine_loop::fail_all() {
  std::vector<request_output> out;
  for (seq_id id : scheduler_.unfinished())
    (void)scheduler_.cancel(id);
  scheduler_.take_pending(out);
  return out;
}

} // namespace troupe::engine
