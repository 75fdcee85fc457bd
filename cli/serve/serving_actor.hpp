// serving_actor: one per deployment, spawned by the head (head_config::spawn_serving) in the head
// daemon's process (design.md §1: "on the head"). On (deploy_atom, deployment_plan) it asks each
// rank's node_actor to spawn a worker_actor, has every rank load (Gloo rendezvous through the
// head's store), then starts the serving engine over a remote_executor and the HTTP server, and
// answers the endpoint. Detached: that handler blocks while the ranks load. Quitting (the head's
// exit message on `cluster serve --stop`) stops the HTTP server; the workers, which monitor it,
// exit too.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "cli/serve/deployment.hpp"

namespace troupe::serve {

struct serving_state {
  std::unique_ptr<deployment> served;
  std::vector<caf::actor> workers;
  ~serving_state();
  static inline const char* name = "serving_actor";
};

caf::behavior serving_actor(caf::stateful_actor<serving_state>* self, caf::actor head,
                            std::string version);

} // namespace troupe::serve
