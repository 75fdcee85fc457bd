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
#include "engine/exec/executor.hpp"
#include "engine/model/model_config.hpp"
#include "runtime/config.hpp"

namespace troupe::serve {

// The context limit and KV pool size a config gets on `model` (0s in the config are derived:
// max_model_len = the model's limit capped at 4096; KV blocks for max_num_seqs full contexts,
// capped at 1 GiB of float32 KV but never below one full context).
struct kv_plan {
  int32_t max_model_len = 0;
  int32_t num_blocks = 0;
};
expected<kv_plan> plan_kv(const deployment_config& config, const engine::model_config& model);

// Makes every replica's executor once the model's config and the KV plan are known: a backend
// in this process (`--block`) or each replica's worker ranks (the head's serving actor), with
// the size of its KV pool (kv.num_blocks, or what a CUDA pool had room for). Blocks while
// loading.
using executor_factory = std::function<expected<std::vector<replica_executor>>(
    const engine::model_config&, const kv_plan&)>;

class deployment {
 public:
  // In this process on the config's device (tensor = pipeline = 1 only), with an actor system
  // of its own for the replica actor. `progress`, when set, gets each replica's load progress
  // (node_id empty), called from one loading thread at a time.
  static expected<std::unique_ptr<deployment>>
  start(const deployment_config& config, std::string version,
        const std::function<void(const msg::rank_progress&)>& progress = {});
  // Replica actors spawned in `sys`, which must outlive the deployment.
  static expected<std::unique_ptr<deployment>> start(const deployment_config& config,
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
