// One served model: tokenizer, executors (in this process: device cpu = CPU backend +
// local_executor, device cuda = CUDA backend on GPU 0 + cuda_executor; or for each replica of a
// cluster deployment its worker ranks), a replica actor per replica behind a replica_router,
// and the HTTP server, built from a model.yaml deployment_config. Used by `cluster serve
// --block`, the head's serving actor (which also takes failed replicas down and swaps restarted
// ones in) and the serving tests. start() blocks while loading weights; the destructor stops the
// HTTP server and the replicas, and joins an in-process deployment's actor system.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <caf/actor_system.hpp>

#include "actors/messages.hpp"
#include "actors/serving/replica_router.hpp"
#include "actors/serving/resolve.hpp"
#include "engine/exec/executor.hpp"
#include "runtime/config.hpp"

namespace troupe::serve {

// Makes every replica's executor for a resolved deployment: a backend in this process
// (`--block`) or each replica's worker ranks (the head's serving actor), with the size of its KV
// pool (the group's kv.num_blocks, or what a CUDA pool had room for). Blocks while loading.
using executor_factory =
    std::function<expected<std::vector<replica_executor>>(const resolved_deployment&)>;

class deployment {
 public:
  // In this process on the config's device (tensor = pipeline = 1 only), with an actor system
  // of its own for the replica actors: reads the model's config, resolves, loads. `progress`,
  // when set, gets each replica's load progress (node_id empty), called from one loading thread
  // at a time.
  static expected<std::unique_ptr<deployment>>
  start(const deployment_config& config, std::string version,
        const std::function<void(const msg::rank_progress&)>& progress = {});
  // Replica actors spawned in `sys`, which must outlive the deployment.
  static expected<std::unique_ptr<deployment>> start(const resolved_deployment& resolved,
                                                     std::string version, caf::actor_system& sys,
                                                     const executor_factory& make_executor);
  ~deployment();

  uint16_t port() const { return port_; }
  const std::string& host() const { return host_; }
  const std::string& name() const { return name_; }
  int32_t max_model_len() const { return max_model_len_; }
  int32_t num_kv_blocks() const { return num_kv_blocks_; }

  // Graceful shutdown of the HTTP endpoint (http_server::drain): no new requests, those in
  // flight get up to `grace_s` to finish, the rest end with an error. Blocks.
  void drain(double grace_s);

  // Replica i (of a disaggregated deployment: the decode replicas, then the prefill ones)
  // failed: requests go to the other replicas, or get HTTP 503 saying `why` while
  // none serves; its replica actor stops.
  void take_down(size_t replica, const std::string& why);
  // Replica i serves again over a new executor (its restarted workers).
  expected<void> replace(size_t replica, replica_executor r);

  struct parts;

 private:
  deployment() = default;
  std::unique_ptr<parts> parts_;
  uint16_t port_ = 0;
  std::string host_, name_;
  int32_t max_model_len_ = 0, num_kv_blocks_ = 0;
};

} // namespace troupe::serve
