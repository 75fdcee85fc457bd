#include "engine/exec/local_executor.hpp"

namespace troupe::engine {

expected<step_result> local_executor::execute(const step_plan& plan) {
  if (plan.seqs.empty()) {
    TROUPE_TRY_VOID(sampler_.sample(plan, out_)); // still drops state of finished sequences
    return step_result{.step = plan.step};
  }
  TROUPE_TRY_VOID(model_.forward(plan, out_));
  if (!model_.makes_logits()) // a pipeline stage before the last: nothing to sample
    return step_result{.step = plan.step};
  return sampler_.sample(plan, out_);
}

} // namespace troupe::engine
