// Where one rank's paged KV cache lives in memory, for moving it between deployments (prefill/
// decode disaggregation, design.md §6). Every backend stores, per layer, a K plane and a V plane
// of [num_blocks][block_size][local kv heads][head_dim] elements; a plane starts at a byte offset
// in one of the rank's KV allocations. Plain data; the transfer plan (cluster/transfer/
// kv_handoff.hpp) maps one rank's layout onto another's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace troupe::engine {

struct kv_layout {
  std::string dtype;       // "float32" (cpu) or "bfloat16" (cuda): both sides must agree
  int32_t elem_bytes = 0;  // 4 or 2
  int32_t num_layers = 0;  // the model's decoder layers
  int32_t layer_begin = 0; // this rank's layers [layer_begin, layer_end) (its pipeline stage)
  int32_t layer_end = 0;
  int32_t num_kv_heads = 0; // the model's key/value heads
  int32_t head_begin = 0;   // this rank's kv heads [head_begin, head_end) (its tensor slice)
  int32_t head_end = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;

  struct allocation {
    void* base = nullptr;
    uint64_t bytes = 0;
    bool on_gpu = false;
  };
  std::vector<allocation> allocations;
  struct plane {
    uint32_t allocation = 0;
    uint64_t offset = 0; // bytes from the allocation's base
  };
  // [local layer][0 = K, 1 = V]
  std::vector<plane> planes;

  int32_t local_heads() const { return head_end - head_begin; }
  uint64_t token_bytes() const {
    return static_cast<uint64_t>(local_heads()) * head_dim * elem_bytes;
  }
  // Byte offset of (block, token in block, local head) within a plane.
  uint64_t at(int32_t block, int32_t token, int32_t local_head) const {
    return (static_cast<uint64_t>(block) * block_size + token) * token_bytes() +
           static_cast<uint64_t>(local_head) * head_dim * elem_bytes;
  }
  const plane& plane_of(int32_t layer, int kv) const {
    return planes[static_cast<size_t>((layer - layer_begin) * 2 + kv)];
  }
};

} // namespace troupe::engine
