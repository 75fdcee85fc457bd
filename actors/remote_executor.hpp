// The executor of a deployment whose ranks are worker actors (possibly on other nodes): sends
// each step plan to every rank and returns the result of the last pipeline stage's tensor rank 0
// (every rank samples the same tokens; that one answers). Called by the serving engine's thread;
// execute() blocks until every rank answered, a rank failed, a rank's actor went down, or the
// timeout passed. After one failure it fails every later step at once (the deployment's KV state
// is unknown): `on_failure` is told the reason once.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/scoped_actor.hpp>

#include "engine/scheduler/executor.hpp"

namespace troupe::actors {

class remote_executor final : public engine::executor {
 public:
  remote_executor(caf::actor_system& sys, std::vector<caf::actor> workers, size_t answer_rank,
                  std::chrono::milliseconds timeout,
                  std::function<void(const std::string&)> on_failure);
  ~remote_executor() override;
  expected<step_result> execute(const step_plan& plan) override;

 private:
  expected<step_result> fail(std::string why);

  caf::actor_system& sys_;
  std::vector<caf::actor> workers_;
  size_t answer_rank_;
  std::chrono::milliseconds timeout_;
  std::function<void(const std::string&)> on_failure_;
  std::unique_ptr<caf::scoped_actor> self_; // made on the calling (engine) thread at first use
  std::string broken_;
};

} // namespace troupe::actors
