// Runs step plans: the one seam between the scheduler and whatever computes. local_executor
// (backend + sampler in this process) implements it today; worker actors over CAF later.
#pragma once

#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

class executor {
 public:
  virtual ~executor() = default;
  // Runs `plan` and returns one seq_output per seq_step that asked for logits, in plan order.
  // Blocks the calling thread until the step is done.
  virtual expected<step_result> execute(const step_plan& plan) = 0;
};

} // namespace troupe::engine
