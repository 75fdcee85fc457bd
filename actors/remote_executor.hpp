// The executor of a deployment whose ranks are worker actors (possibly on other nodes): sends
// each step plan to every rank and returns the result of the last pipeline stage's tensor rank 0
// (it samples; the others answer only to report success). Called by the serving engine's
// thread. Its depth is the number of pipeline stages: engine_loop keeps that many plans in
// flight, which queue in the workers' mailboxes, so every stage is busy with a different plan.
// collect() blocks until every rank answered the oldest plan, a rank failed, a rank's actor went
// down, or the timeout passed. After one failure it fails every later plan at once (the
// deployment's KV state is unknown): `on_failure` is told the reason once.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/scoped_actor.hpp>

#include "engine/exec/executor.hpp"

namespace troupe::actors {

class remote_executor final : public engine::executor {
 public:
  remote_executor(caf::actor_system& sys, std::vector<caf::actor> workers, size_t answer_rank,
                  std::chrono::milliseconds timeout,
                  std::function<void(const std::string&)> on_failure, int32_t depth = 1);
  ~remote_executor() override;
  expected<step_result> execute(const step_plan& plan) override;
  int32_t depth() const override { return depth_; }
  expected<void> submit(const step_plan& plan) override;
  expected<step_result> collect() override;

 private:
  // Replies so far to one submitted plan.
  struct pending {
    uint64_t step = 0; // the plan's step number, for messages
    std::vector<bool> answered;
    size_t got = 0;
    step_result result;
    std::string error;
  };
  expected<step_result> fail(std::string why);

  caf::actor_system& sys_;
  std::vector<caf::actor> workers_;
  size_t answer_rank_;
  std::chrono::milliseconds timeout_;
  std::function<void(const std::string&)> on_failure_;
  int32_t depth_;
  std::unique_ptr<caf::scoped_actor> self_; // made on the calling (engine) thread at first use
  uint64_t next_ticket_ = 1;
  std::deque<uint64_t> in_flight_;      // tickets, oldest first
  std::map<uint64_t, pending> replies_; // by ticket
  std::string broken_;
};

} // namespace troupe::actors
