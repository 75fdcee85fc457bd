// comm::rendezvous_store over the head's KV store (kv_set / kv_get / kv_wait requests to
// head_actor, namespaced per deployment): how Gloo ranks on different nodes find each other.
// Calls block the calling thread (a worker's compute thread, never an actor's) until the head
// answers.
#pragma once

#include <string>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>

#include "engine/comm/communicator.hpp"

namespace troupe::actors {

class head_rendezvous_store final : public engine::comm::rendezvous_store {
 public:
  head_rendezvous_store(caf::actor_system& sys, caf::actor head, std::string token, std::string ns)
    : sys_(sys), head_(std::move(head)), token_(std::move(token)), ns_(std::move(ns)) {}

  expected<void> set(const std::string& key, const std::vector<char>& value) override;
  expected<std::vector<char>> get(const std::string& key,
                                  std::chrono::milliseconds timeout) override;
  expected<void> wait(const std::vector<std::string>& keys,
                      std::chrono::milliseconds timeout) override;

 private:
  caf::actor_system& sys_;
  caf::actor head_;
  std::string token_, ns_;
};

} // namespace troupe::actors
