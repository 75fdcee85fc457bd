// Links the replicas of a disaggregated deployment that run in this process: every replica's KV
// cache registered with a transport of the configured provider, and one connection from every
// prefill replica to every decode replica (connected now, once, never per request), with the
// layout contract (kv_handoff_plan) of each pair. Blocks while connecting.
#pragma once

#include <memory>
#include <vector>

#include "actors/serving/handoff.hpp"
#include "engine/kv/kv_layout.hpp"
#include "runtime/config.hpp"

namespace troupe::serve {

struct handoff_links {
  std::vector<std::shared_ptr<prefill_role>> prefill; // by prefill replica
  // By prefill replica: its pusher, for its backend to own and report its layers to (the role
  // only refers to it).
  std::vector<std::shared_ptr<layer_pusher>> pushers;
  std::vector<std::shared_ptr<decode_role>> decode; // by decode replica
  std::shared_ptr<handoff_stats> stats;
  std::string describe; // the provider and the layout contract, for the serve log
};

// `decode_owners`: what owns each decode replica's KV memory (kept alive while a push may write
// it). Errors name the reason: the groups' layouts do not agree (different model or dtype), the
// provider is absent or cannot reach the KV memory (GPU memory over a host-only provider), or a
// connection failed.
expected<handoff_links> link_in_process(const disaggregation_config& config,
                                        const std::vector<engine::kv_layout>& prefill,
                                        const std::vector<engine::kv_layout>& decode,
                                        const std::vector<std::shared_ptr<void>>& decode_owners);

} // namespace troupe::serve
