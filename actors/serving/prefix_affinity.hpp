// Prefix-cache affinity for the router (plain C++): remembers which replica last took each
// block-aligned prompt prefix (a chain hash per full block, as the prefix cache keys its
// blocks) and names the replica holding the longest prefix of a new prompt. Requests sharing a
// system prompt or a conversation's history then go where its KV is cached, so a replica
// prefills (and a disaggregated deployment transfers) only what it lacks. Bounded: the oldest
// entries are forgotten first. Not thread-safe (the router holds its lock).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <unordered_map>

#include "runtime/step.hpp"

namespace troupe::serve {

class prefix_affinity {
 public:
  explicit prefix_affinity(int32_t block_size, size_t capacity = 1 << 16)
    : block_size_(block_size > 0 ? block_size : 16), capacity_(capacity) {}

  struct match {
    size_t replica = 0;
    int32_t tokens = 0; // the length of the prefix it took (whole blocks)
  };
  // The replica that last took the longest block-aligned prefix of `prompt`.
  std::optional<match> lookup(std::span<const token_id> prompt) const;
  // `replica` took `prompt`: each of its block-aligned prefixes now points there.
  void record(size_t replica, std::span<const token_id> prompt);
  // `replica` lost its cache (restarted, taken down): nothing points there any more.
  void forget(size_t replica);
  size_t size() const { return owner_.size(); }

 private:
  int32_t block_size_;
  size_t capacity_;
  std::unordered_map<uint64_t, size_t> owner_; // prefix hash -> replica
  std::deque<uint64_t> order_;                 // insertion order, for eviction
};

} // namespace troupe::serve
