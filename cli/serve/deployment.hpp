// One model served in this process: tokenizer, backend and executor (device: cpu = CPU backend +
// local_executor; device: cuda = CUDA backend on GPU 0 + cuda_executor), serving engine and
// HTTP server, built from a model.yaml deployment_config. Used by `cluster serve --block` and by
// the serving tests. start() blocks while loading weights; the destructor stops and joins.
#pragma once

#include <memory>
#include <string>

#include "engine/config/deployment_config.hpp"
#include "engine/model/model_config.hpp"

namespace troupe::serve {

class deployment {
 public:
  static expected<std::unique_ptr<deployment>> start(const engine::deployment_config& config,
                                                     std::string version);
  ~deployment();

  uint16_t port() const { return port_; }
  const std::string& host() const { return host_; }
  const std::string& name() const { return name_; }
  int32_t max_model_len() const { return max_model_len_; }
  int32_t num_kv_blocks() const { return num_kv_blocks_; }

  struct parts;

 private:
  deployment() = default;
  std::unique_ptr<parts> parts_;
  uint16_t port_ = 0;
  std::string host_, name_;
  int32_t max_model_len_ = 0, num_kv_blocks_ = 0;
};

// The context limit and KV pool size a config gets on `model` (0s in the config are derived:
// max_model_len = the model's limit capped at 4096; KV blocks for max_num_seqs full contexts,
// capped at 1 GiB of float32 KV but never below one full context).
struct kv_plan {
  int32_t max_model_len = 0;
  int32_t num_blocks = 0;
};
expected<kv_plan> plan_kv(const engine::deployment_config& config,
                          const engine::model_config& model);

} // namespace troupe::serve
