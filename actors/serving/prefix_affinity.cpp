#include "actors/serving/prefix_affinity.hpp"

#include <algorithm>

namespace troupe::serve {

namespace {

// FNV-1a over the previous block's hash and this block's tokens.
uint64_t chain(uint64_t prev, std::span<const token_id> block) {
  uint64_t h = 1469598103934665603ull ^ prev;
  for (token_id t : block) {
    h ^= static_cast<uint32_t>(t);
    h *= 1099511628211ull;
  }
  return h;
}

} // namespace

std::optional<prefix_affinity::match>
prefix_affinity::lookup(std::span<const token_id> prompt) const {
  std::optional<match> best;
  uint64_t h = 0;
  const auto bs = static_cast<size_t>(block_size_);
  for (size_t end = bs; end <= prompt.size(); end += bs) {
    h = chain(h, prompt.subspan(end - bs, bs));
    auto it = owner_.find(h);
    if (it == owner_.end())
      break; // a longer prefix cannot be known without this one
    best = match{it->second, static_cast<int32_t>(end)};
  }
  return best;
}

void prefix_affinity::record(size_t replica, std::span<const token_id> prompt) {
  uint64_t h = 0;
  const auto bs = static_cast<size_t>(block_size_);
  for (size_t end = bs; end <= prompt.size(); end += bs) {
    h = chain(h, prompt.subspan(end - bs, bs));
    auto [it, fresh] = owner_.insert_or_assign(h, replica);
    if (fresh)
      order_.push_back(h);
  }
  while (owner_.size() > capacity_ && !order_.empty()) {
    owner_.erase(order_.front());
    order_.pop_front();
  }
}

void prefix_affinity::forget(size_t replica) {
  std::erase_if(owner_, [&](const auto& e) { return e.second == replica; });
  std::erase_if(order_, [&](uint64_t h) { return !owner_.count(h); });
}

} // namespace troupe::serve
