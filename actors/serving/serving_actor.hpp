// serving_actor: one per deployment, spawned by the head (head_config::spawn_serving) in the head
// daemon's process (design.md §1: "on the head"). On (deploy_atom, deployment_plan) a loader per
// replica asks each rank's node_actor to spawn a worker_actor and has every rank load (Gloo/NCCL
// rendezvous through the head's store under the replica's own namespace); once every replica has
// loaded it starts the deployment (a replica actor per replica over its workers, the
// replica_router, the HTTP server) and answers the endpoint.
// Failure and restart: a replica whose ranks fail, or one of whose workers goes down (this
// actor monitors them, so an idle replica's loss is seen too), is marked failed in the router at
// once (no new requests go there) and reported to the head (failed_atom). The head's registry
// decides; it sends (drop_atom): the replica's actor stops and its workers are told to exit;
// then, once it has placed the replica again, (restart_atom, replica_plan): a loader spawns and
// loads the new workers and their executor is swapped in; the answer is the new namespace.
// Loaders are detached blocking actors, so this actor stays responsive (`cluster serve --stop`
// ends it at once); it blocks only to start the deployment (tokenizer, HTTP server).
// Disaggregated deployments (decode replicas first, then prefill): each rank opens its KV
// transfer endpoint as it loads; once both groups have loaded, every prefill replica's ranks
// link to every decode replica's (a restarted replica is linked before it serves again), and
// the provider and layout contract go to the head for `cluster status` (linked_atom).
// Quitting stops the HTTP server; the workers, which monitor
// this actor, exit too, including those of a replica still loading.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_response_promise.hpp>

#include "actors/messages.hpp"
#include "actors/serving/deployment.hpp"

namespace troupe::serve {

struct serving_state {
  caf::actor head; // the head that spawned this actor
  std::unique_ptr<deployment> served;
  // The deployment as the head resolved it, and parts of it at hand: its config, and per group
  // (one, or decode then prefill) the layout and the KV plan.
  std::shared_ptr<const resolved_deployment> resolved;
  deployment_config config;
  std::vector<replica_group> groups;
  std::vector<kv_plan> group_kv;
  // Disaggregated: each replica's ranks' KV endpoints (its current attempt), and the handoffs'
  // counters shared by every replica.
  std::vector<std::vector<msg::kv_rank>> kv_ranks;
  std::shared_ptr<handoff_stats> handoffs;
  // Disaggregated with GPU KV and every rank on one host (kv_cuda_ipc_host, decided when it
  // loads): that host, and the KV goes by CUDA IPC; "" otherwise.
  std::string kv_ipc_host;
  // Per replica: the namespace of the attempt it serves or loads ("" after a drop: every
  // message of an older attempt is stale), and its workers once loaded.
  std::vector<std::string> ns;
  std::vector<std::vector<caf::actor>> workers;
  // The first load: the head's deploy request, answered once every replica has loaded.
  caf::typed_response_promise<std::string> first;
  std::vector<msg::replica_loaded> first_loaded;
  // Restarts in flight: replica -> the head's restart request.
  std::map<int32_t, caf::typed_response_promise<std::string>> restarting;
  // Per replica: its health (marked failed by its replica actor, and here when a worker goes down
  // while the replica is idle), and the monitored workers: address -> (replica, namespace, rank).
  std::vector<std::shared_ptr<replica_health>> health;
  struct watched_worker {
    int32_t replica = 0;
    std::string ns;
    size_t rank = 0;
    std::string node_id;
  };
  std::vector<std::vector<std::string>> rank_nodes; // per replica attempt: each rank's node
  std::map<caf::actor_addr, watched_worker> watched;
  ~serving_state();
  static inline const char* name = "serving_actor";
};

caf::behavior serving_actor(caf::stateful_actor<serving_state>* self, caf::actor head,
                            std::string version);

} // namespace troupe::serve
