// The layout contract between a prefill group and a decode group (design.md §6): computed once
// when both groups have loaded, from every rank's kv_layout, it says which prefill rank sends
// which (layer, kv heads) to which decode rank, and turns one request's block tables into the
// write ranges of each (prefill rank -> decode rank) batch. The groups may differ in tensor size
// (heads split differently), pipeline size (layers split differently) and block size; they
// must agree on the model (layers, kv heads, head_dim) and the KV dtype, or make() says why.
// Plain and synchronous.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"
#include "engine/kv/kv_layout.hpp"

namespace troupe::cluster::transfer {

// One prefill rank's share of one decode rank's layer: kv heads [head_begin, head_end).
struct handoff_route {
  uint32_t prefill_rank = 0, decode_rank = 0;
  int32_t layer = 0;
  int32_t head_begin = 0, head_end = 0;
};

class kv_handoff_plan {
 public:
  // `prefill` and `decode`: every rank's layout, in rank order. A head held by several prefill
  // ranks (replicated when tensor > kv heads) is sent once, by the first.
  static expected<kv_handoff_plan> make(std::vector<engine::kv_layout> prefill,
                                        std::vector<engine::kv_layout> decode);

  // The (prefill rank, decode rank) pairs that exchange anything, each one batch per request.
  const std::vector<std::pair<uint32_t, uint32_t>>& pairs() const { return pairs_; }
  const std::vector<handoff_route>& routes() const { return routes_; }
  const engine::kv_layout& prefill(uint32_t rank) const { return prefill_[rank]; }
  const engine::kv_layout& decode(uint32_t rank) const { return decode_[rank]; }

  // The writes of pair `pair` (index into pairs()) moving prompt positions [begin, end) from the
  // prefill rank's blocks to the decode rank's: local indices are the prefill rank's
  // allocations, remote indices the decode rank's. Ranges contiguous on both sides are whole
  // runs of tokens where the head split allows. Errors when a block table is too short.
  // `layer` >= 0: only that layer's ranges (a push sent layer by layer while the prefill runs).
  expected<void> ranges(size_t pair, std::span<const int32_t> prefill_blocks,
                        std::span<const int32_t> decode_blocks, int32_t begin, int32_t end,
                        std::vector<write_range>& out, int32_t layer = -1) const;
  // Bytes one token's KV takes over all layers and heads (what a transfer moves per position).
  uint64_t bytes_per_token() const;
  // What prefill rank `rank` sends per position, to every decode rank together.
  uint64_t bytes_per_token(uint32_t rank) const;
  // "2 prefill ranks -> 1 decode rank, 28 layers, 8 kv heads x 128 bfloat16, blocks 16 -> 32".
  std::string describe() const;

 private:
  std::vector<engine::kv_layout> prefill_, decode_;
  std::vector<handoff_route> routes_; // grouped by pair, in pairs() order
  std::vector<std::pair<uint32_t, uint32_t>> pairs_;
  std::vector<size_t> pair_begin_; // routes_[pair_begin_[i], pair_begin_[i + 1]) belong to pair i
};

} // namespace troupe::cluster::transfer
