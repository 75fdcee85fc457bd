// A deployment resolved once, before anything loads. `cluster serve --block` and the head (before
// placing ranks) call resolve() with the model's config; placement, the serving actor, the replica
// loaders and the deployment take the result and never derive any of it again. Plain C++: no
// I/O, no CAF.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "engine/model/model_config.hpp"
#include "runtime/config.hpp"
#include "runtime/error.hpp"

namespace troupe::serve {

// The context limit and KV pool size a group gets on `model` (0s in the config are derived:
// max_model_len = the model's limit capped at 4096; KV blocks for max_num_seqs full contexts,
// capped at 1 GiB of float32 KV but never below one full context). A GPU rank's pool may end up
// larger or smaller (sized from gpu_memory_utilization when num_kv_blocks is 0).
struct kv_plan {
  int32_t max_model_len = 0;
  int32_t num_blocks = 0;
};
expected<kv_plan> plan_kv(const deployment_config& config, const engine::model_config& model);

struct resolved_group {
  replica_group group; // role, sizes, block size
  kv_plan kv;
};

struct resolved_deployment {
  deployment_config config;           // device: cpu or cuda, never auto
  engine::model_config model;         // the model's config.json (or GGUF metadata)
  std::vector<resolved_group> groups; // replica_groups(config) order: the one, or decode, prefill
};

// Everything that can be refused from the config and the model alone, with the reason: the
// device (`auto` becomes `auto_device`, the caller's choice from the GPUs it can see), dtype
// against the device, each group's tensor/pipeline/expert sizes against the model's heads,
// layers and experts, and its context length and KV pool.
expected<resolved_deployment> resolve(deployment_config config, engine::model_config model,
                                      std::string_view auto_device);

} // namespace troupe::serve
