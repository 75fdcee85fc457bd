// The scheduler's view of one worker group's paged KV cache: a fixed pool of blocks with
// reference counts, and a prefix cache that lets a sequence reuse full blocks another one
// computed. Owned and called by the scheduler (serving actor thread); nothing here blocks.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine::kv {

using block_hash = uint64_t;

// Chained hash of a full block: depends on its tokens and, through `parent`, on every earlier
// token of the sequence (parent = 0 for a sequence's first block).
block_hash hash_block(block_hash parent, std::span<const token_id> tokens);

struct pool_stats {
  uint64_t lookups = 0;   // full blocks looked up in the prefix cache
  uint64_t hits = 0;      // ... and found
  uint64_t evictions = 0; // cached blocks reused for other content
};

// Block states: referenced (ref > 0); free and uncached; free and cached (evictable, kept in LRU
// order, still findable by hash). A cached block is trusted only if its tokens equal the
// lookup's and its parent is the same physical block in the same generation (a block's
// generation changes whenever it is handed out again), so a hash collision can never alias.
class block_pool {
 public:
  block_pool(int32_t num_blocks, int32_t block_size, bool prefix_caching);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_.size()); }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks allocate() can hand out now: unreferenced ones, cached or not.
  int32_t num_free() const { return static_cast<int32_t>(free_.size()) + lru_size_; }
  // Fraction of blocks referenced by sequences, for metrics.
  double usage() const { return 1.0 - static_cast<double>(num_free()) / num_blocks(); }
  int32_t num_cached() const { return static_cast<int32_t>(by_hash_.size()); }
  const pool_stats& stats() const { return stats_; }
  double hit_rate() const {
    return stats_.lookups ? static_cast<double>(stats_.hits) / stats_.lookups : 0.0;
  }

  // Appends n blocks (reference count 1) to `out`, or none when fewer than n are free. Uncached
  // blocks go first, then the least recently released cached ones (evicting them).
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Drops one reference; at zero the block becomes free (evictable if cached).
  void release(int32_t block);
  // Releases a block table, last block first, so the tail of a sequence is evicted first.
  void release_all(std::vector<int32_t>& blocks);

  // The cached block holding `tokens` after `parent_block` (-1 for a first block), or -1.
  // Counts a lookup (and a hit). The caller takes the block with acquire().
  int32_t lookup(block_hash hash, std::span<const token_id> tokens, int32_t parent_block);
  void acquire(int32_t block);
  // Registers a full, computed block under `hash` so later sequences can reuse it. A no-op when
  // prefix caching is off or another block already holds this hash.
  void cache(int32_t block, block_hash hash, std::span<const token_id> tokens,
             int32_t parent_block);

  int32_t ref_count(int32_t block) const { return ref_[static_cast<size_t>(block)]; }
  // Checks every internal invariant (tests and simulations): counts, lists, map. O(num_blocks).
  expected<void> check() const;

 private:
  void lru_push_back(int32_t b);
  void lru_remove(int32_t b);
  void uncache(int32_t b);

  int32_t block_size_;
  bool prefix_caching_;
  std::vector<int32_t> ref_;
  std::vector<uint32_t> generation_;
  std::vector<int32_t> free_; // unreferenced, uncached (a stack)
  // Cached blocks: hash (valid when cached_), tokens, parent identity.
  std::vector<uint8_t> cached_;
  std::vector<block_hash> hash_;
  std::vector<token_id> tokens_; // [num_blocks, block_size]
  std::vector<int32_t> parent_;
  std::vector<uint32_t> parent_generation_;
  std::unordered_map<block_hash, int32_t> by_hash_;
  // Intrusive LRU list of unreferenced cached blocks: head = least recently released.
  std::vector<int32_t> prev_, next_;
  int32_t lru_head_ = -1, lru_tail_ = -1, lru_size_ = 0;
  pool_stats stats_;
};

} // namespace troupe::engine::kv
