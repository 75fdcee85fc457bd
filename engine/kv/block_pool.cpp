#include "engine/kv/block_pool.hpp"

#include <algorithm>

namespace troupe::engine::kv {

namespace {
uint64_t mix(uint64_t x) { // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
} // namespace

block_hash hash_block(block_hash parent, std::span<const token_id> tokens) {
  uint64_t h = mix(parent ^ 0x7472'6f75'7065ull);
  for (token_id t : tokens)
    h = mix(h ^ static_cast<uint32_t>(t));
  return h == 0 ? 1 : h; // 0 stays "no parent"
}

block_pool::block_pool(int32_t num_blocks, int32_t block_size, bool prefix_caching)
  : block_size_(block_size), prefix_caching_(prefix_caching),
    ref_(static_cast<size_t>(num_blocks), 0), generation_(ref_.size(), 0), cached_(ref_.size(), 0),
    hash_(ref_.size(), 0),
    tokens_(prefix_caching ? ref_.size() * static_cast<size_t>(block_size) : 0),
    parent_(ref_.size(), -1), parent_generation_(ref_.size(), 0), prev_(ref_.size(), -1),
    next_(ref_.size(), -1) {
  free_.reserve(ref_.size());
  if (prefix_caching)
    by_hash_.reserve(ref_.size()); // no rehash in the middle of a step
  // Popped from the back: block 0 is handed out first.
  for (int32_t b = num_blocks - 1; b >= 0; --b)
    free_.push_back(b);
}

void block_pool::lru_push_back(int32_t b) {
  prev_[b] = lru_tail_;
  next_[b] = -1;
  if (lru_tail_ >= 0)
    next_[lru_tail_] = b;
  else
    lru_head_ = b;
  lru_tail_ = b;
  ++lru_size_;
}

void block_pool::lru_remove(int32_t b) {
  if (prev_[b] >= 0)
    next_[prev_[b]] = next_[b];
  else
    lru_head_ = next_[b];
  if (next_[b] >= 0)
    prev_[next_[b]] = prev_[b];
  else
    lru_tail_ = prev_[b];
  prev_[b] = next_[b] = -1;
  --lru_size_;
}

void block_pool::uncache(int32_t b) {
  auto it = by_hash_.find(hash_[b]);
  if (it != by_hash_.end() && it->second == b)
    by_hash_.erase(it);
  cached_[b] = 0;
}

bool block_pool::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n > num_free())
    return false;
  for (int32_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      b = lru_head_;
      lru_remove(b);
      uncache(b);
      ++stats_.evictions;
    }
    ++generation_[b];
    ref_[b] = 1;
    out.push_back(b);
  }
  return true;
}

void block_pool::release(int32_t b) {
  if (--ref_[b] > 0)
    return;
  if (cached_[b])
    lru_push_back(b);
  else
    free_.push_back(b);
}

void block_pool::release_all(std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it)
    release(*it);
  blocks.clear();
}

int32_t block_pool::lookup(block_hash hash, std::span<const token_id> tokens,
                           int32_t parent_block) {
  if (!prefix_caching_)
    return -1;
  ++stats_.lookups;
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end())
    return -1;
  int32_t b = it->second;
  bool parent_ok = parent_[b] == parent_block &&
                   (parent_block < 0 || parent_generation_[b] == generation_[parent_block]);
  const token_id* mine = tokens_.data() + static_cast<size_t>(b) * block_size_;
  if (!parent_ok || !std::equal(tokens.begin(), tokens.end(), mine))
    return -1;
  ++stats_.hits;
  return b;
}

void block_pool::acquire(int32_t b) {
  if (ref_[b]++ == 0)
    lru_remove(b);
}

void block_pool::cache(int32_t b, block_hash hash, std::span<const token_id> tokens,
                       int32_t parent_block) {
  if (!prefix_caching_ || cached_[b] || by_hash_.count(hash))
    return;
  by_hash_.emplace(hash, b);
  cached_[b] = 1;
  hash_[b] = hash;
  std::copy(tokens.begin(), tokens.end(),
            tokens_.begin() + static_cast<ptrdiff_t>(b) * block_size_);
  parent_[b] = parent_block;
  parent_generation_[b] = parent_block >= 0 ? generation_[parent_block] : 0;
}

expected<void> block_pool::check() const {
  const int32_t n = num_blocks();
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  for (int32_t b : free_) {
    if (b < 0 || b >= n || seen[b]++)
      return make_error(errc::internal, "block {} is twice in the free list (or out of range)", b);
    if (ref_[b] != 0 || cached_[b])
      return make_error(errc::internal, "free block {} has ref {} cached {}", b, ref_[b],
                        cached_[b]);
  }
  int32_t count = 0;
  for (int32_t b = lru_head_, prev = -1; b >= 0; prev = b, b = next_[b]) {
    if (seen[b]++ || prev_[b] != prev || ++count > n)
      return make_error(errc::internal, "LRU list is corrupt at block {}", b);
    if (ref_[b] != 0 || !cached_[b])
      return make_error(errc::internal, "evictable block {} has ref {} cached {}", b, ref_[b],
                        cached_[b]);
  }
  if (count != lru_size_)
    return make_error(errc::internal, "LRU holds {} blocks, size says {}", count, lru_size_);
  for (int32_t b = 0; b < n; ++b) {
    if (ref_[b] < 0)
      return make_error(errc::internal, "block {} has negative ref {} (freed twice)", b, ref_[b]);
    if (ref_[b] == 0 && !seen[b])
      return make_error(errc::internal, "block {} is unreferenced but not free (leaked)", b);
    if (ref_[b] > 0 && seen[b])
      return make_error(errc::internal, "block {} is referenced and free", b);
  }
  for (const auto& [h, b] : by_hash_)
    if (!cached_[b] || hash_[b] != h)
      return make_error(errc::internal, "hash map names block {} which does not hold it", b);
  return {};
}

} // namespace troupe::engine::kv
