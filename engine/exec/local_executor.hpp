// An executor in this process: one backend's forward pass, then the sampler on its logits.
// Used by tests, `cluster generate`-style tools and single-process serving. execute() blocks.
#pragma once

#include "engine/backend/backend.hpp"
#include "engine/exec/executor.hpp"
#include "engine/sampling/sampler.hpp"

namespace troupe::engine {

class local_executor final : public executor {
 public:
  explicit local_executor(backend& model) : model_(model) {}
  expected<step_result> execute(const step_plan& plan) override;

 private:
  backend& model_;
  sampler sampler_;
  forward_output out_;
};

} // namespace troupe::engine
