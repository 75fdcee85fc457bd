// Mixture-of-experts on CPU ranks, float32: the top-k router, the experts a rank holds run on the
// tokens routed to them, and expert parallelism with data-parallel tokens (each rank brings its
// own tokens; their rows travel to the experts' ranks and back by all-to-all). The CPU backend's
// MoE layers call moe_route + moe_local; moe_all_to_all is the dispatch/combine for attention
// that is data-parallel rather than tensor-parallel (docs/architecture.md, expert parallelism).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/backend/shard.hpp"
#include "engine/comm/communicator.hpp"
#include "runtime/error.hpp"

namespace troupe::engine::cpu {

struct moe_shape {
  int64_t hidden = 0;
  int64_t experts = 0; // router width: every expert of the model
  int64_t top_k = 0;
  int64_t intermediate = 0; // rows of each expert held here (a slice when experts are sliced)
  bool norm_topk_prob = true;
};

// One expert as this rank holds it: gate and up [intermediate, hidden], down [hidden,
// intermediate].
struct expert_view {
  const float* gate = nullptr;
  const float* up = nullptr;
  const float* down = nullptr;
};

// Softmax of h[n, hidden] · router[experts, hidden]^T, then per token the top_k experts by
// probability (ties to the lower id) into ids[n * top_k] with their weights (renormalised to sum
// to 1 when norm_topk_prob).
void moe_route(const moe_shape& s, const float* router, const float* h, int64_t n,
               std::vector<int32_t>& ids, std::vector<float>& weights);

// out[n, hidden] = for each token, the weighted sum of the experts [first, first + local.size())
// among its routed ones applied to h[t] (0 where none is). Experts run in id order, each on all
// of its tokens at once.
void moe_local(const moe_shape& s, const int32_t* ids, const float* weights, int64_t n,
               const float* h, int64_t first, std::span<const expert_view> local, float* out);

// Expert parallelism over data-parallel tokens. Every rank of `group` brings its own tokens
// h[n, hidden] (n may differ between ranks, 0 included) and holds the whole experts
// split_range(experts, group.size(), group.rank()) as `local`. Each rank routes its tokens, sends
// every (token, expert) pair's row to the expert's rank (all-to-all), runs its experts on the rows
// it received, sends the results back (all-to-all), and writes the combined out[n, hidden]: what
// moe_local over every expert gives, summed in the same order. Blocks on the collectives; every
// rank of the group must call it for the same layer.
expected<void> moe_all_to_all(comm::communicator& group, const moe_shape& s, const float* router,
                              std::span<const expert_view> local, const float* h, int64_t n,
                              float* out);

} // namespace troupe::engine::cpu
