// worker_actor: one rank of a deployment (design.md §1), spawned by the node_actor of the host
// the head placed it on. Owns a backend shard (device: cpu = CPU backend with Gloo
// communicators; cuda = CUDA backend on its GPU with NCCL communicators, sampling on the GPU),
// whose rendezvous goes through the head's KV store under the deployment's namespace. Detached:
// loading, Gloo rendezvous and forward passes block its own thread, never CAF's scheduler.
//   (load_atom)               -> sends worker_reply (error empty: loaded) to the sender
//   (execute_atom, ticket, step_plan) -> sends worker_reply{ticket, result} to the sender.
//     Plans queue in its mailbox: a pipeline stage starts the next plan as soon as it has
//     passed this one on, so the stages of a deployment work on different plans at once.
//   Disaggregated deployments (spec.kv_role): the load opens the rank's kv_rank_endpoint and
//   the reply carries where its KV is; then (link_atom, kv_link) -> string error ("" linked),
//   (push_atom, kv_push), (cancel_atom, uint64 lease) and (kv_notify_atom) as messages.hpp says.
// It quits when `owner` (the deployment's serving actor) goes away.
#pragma once

#include "actors/role_guard.hpp"

#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/head_rendezvous_store.hpp"
#include "actors/messages.hpp"
#include "actors/serving/kv_rank_endpoint.hpp"
#include "engine/backend/backend.hpp"
#include "engine/comm/communicator.hpp"
#include "engine/comm/device_communicator.hpp"
#include "engine/exec/executor.hpp"

namespace troupe::actors {

struct worker_state {
  std::unique_ptr<head_rendezvous_store> store;
  std::unique_ptr<engine::comm::communicator> tensor, world;                // cpu (Gloo)
  std::unique_ptr<engine::comm::device_communicator> gpu_tensor, gpu_world; // cuda (NCCL)
  std::unique_ptr<engine::backend> model;
  std::unique_ptr<engine::executor> exec; // refers to model: declared after it, destroyed first
  // Disaggregated deployments: this rank's KV registered for transfers (before the model goes).
  std::unique_ptr<serve::kv_rank_endpoint> kv;
  ~worker_state() {
    if (model && kv) // its pusher listens to the model's layers
      (void)model->set_kv_listener(nullptr);
  }
  static inline const char* name = "worker_actor";
};

struct worker_context {
  caf::actor head;     // for the rendezvous store
  std::string token;   // the cluster token (kv requests carry it)
  std::string address; // the address this rank's Gloo listens on (the node's address)
  caf::actor owner;    // the serving actor: the worker quits when it is down
};

// Roles (docs/security.md): load, execute, link and push only from the owner's process (the
// serving side), cancel also from anonymous senders of it (a cancelled lease only aborts a
// transfer); others are dropped and logged.
caf::behavior worker_actor(caf::stateful_actor<worker_state, guarded_actor>* self,
                           msg::worker_spec spec, worker_context ctx);

} // namespace troupe::actors
