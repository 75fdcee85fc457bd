#include "engine/tokenizer/bpe.hpp"

#include <queue>

#include "engine/tokenizer/utf8.hpp"

namespace troupe::engine {

namespace {
constexpr size_t cache_max_word = 128; // bytes; longer pieces are not cached
constexpr size_t cache_max_entries = 1 << 17;
constexpr size_t small_word = 48; // symbols; longer words use the heap
} // namespace

expected<bpe_model>
bpe_model::create(const std::vector<std::string>& vocab,
                  const std::vector<std::pair<std::string, std::string>>& merges,
                  bool ignore_merges) {
  bpe_model m;
  m.ignore_merges_ = ignore_merges;
  m.vocab_.reserve(vocab.size());
  for (size_t id = 0; id < vocab.size(); ++id)
    if (!vocab[id].empty())
      m.vocab_.emplace(vocab[id], static_cast<token_id>(id));
  // A byte without a token (SmolLM2 has none for some control bytes) is dropped when encoding,
  // as Hugging Face's BPE does for a character it cannot map and no unk_token.
  for (int b = 0; b < 256; ++b) {
    const auto it = m.vocab_.find(std::string(1, static_cast<char>(b)));
    m.byte_ids_[b] = it == m.vocab_.end() ? -1 : it->second;
  }
  m.merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const token_id ia = m.find(a), ib = m.find(b), ir = m.find(a + b);
    if (ia < 0 || ib < 0 || ir < 0)
      return make_error(errc::parse_error, "BPE merge {} ('{}' '{}'): {} is not in the vocabulary",
                        rank, utf8::byte_level_encode(a), utf8::byte_level_encode(b),
                        ia < 0   ? "its first part"
                        : ib < 0 ? "its second part"
                                 : "the merged token");
    // A repeated pair keeps its last rank, as Hugging Face's merge map does.
    m.merges_.insert_or_assign(pair_key(ia, ib), merge_info{static_cast<int32_t>(rank), ir});
  }
  return m;
}

token_id bpe_model::find(std::string_view bytes) const {
  const auto it = vocab_.find(std::string(bytes));
  return it == vocab_.end() ? -1 : it->second;
}

const bpe_model::merge_info* bpe_model::find_merge(token_id a, token_id b) const {
  const auto it = merges_.find(pair_key(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

// Repeatedly merges the lowest-ranked adjacent pair (leftmost on ties): quadratic, fast when short.
void bpe_model::merge_small(std::vector<token_id>& s) const {
  while (s.size() > 1) {
    int32_t best_rank = INT32_MAX;
    size_t best = 0;
    token_id result = -1;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const merge_info* m = find_merge(s[i], s[i + 1]);
      if (m != nullptr && m->rank < best_rank) {
        best_rank = m->rank;
        best = i;
        result = m->result;
      }
    }
    if (result < 0)
      return;
    s[best] = result;
    s.erase(s.begin() + static_cast<ptrdiff_t>(best) + 1);
  }
}

// The same order of merges through a heap of candidate pairs over a linked list of symbols.
void bpe_model::merge_large(std::vector<token_id>& s) const {
  const int n = static_cast<int>(s.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct candidate {
    int32_t rank;
    int pos;
    token_id result;
    bool operator>(const candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<candidate, std::vector<candidate>, std::greater<>> heap;
  auto push = [&](int pos) {
    if (pos < 0 || next[pos] < 0)
      return;
    if (const merge_info* m = find_merge(s[pos], s[next[pos]]))
      heap.push({m->rank, pos, m->result});
  };
  for (int i = 0; i + 1 < n; ++i)
    push(i);
  while (!heap.empty()) {
    const candidate top = heap.top();
    heap.pop();
    if (!alive[top.pos] || next[top.pos] < 0)
      continue;
    const int right = next[top.pos];
    const merge_info* m = find_merge(s[top.pos], s[right]);
    if (m == nullptr || m->rank != top.rank || m->result != top.result)
      continue; // stale: one side changed since this pair was queued
    s[top.pos] = top.result;
    alive[right] = false;
    next[top.pos] = next[right];
    if (next[right] >= 0)
      prev[next[right]] = top.pos;
    push(prev[top.pos]);
    push(top.pos);
  }
  size_t out = 0;
  for (int i = 0; i >= 0 && i < n; i = next[i])
    s[out++] = s[i];
  s.resize(out);
}

void bpe_model::encode(std::string_view piece, std::vector<token_id>& out) const {
  if (ignore_merges_) {
    if (const token_id id = find(piece); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (piece.size() == 1) {
    if (const token_id id = byte_ids_[static_cast<unsigned char>(piece[0])]; id >= 0)
      out.push_back(id);
    return;
  }
  const bool cacheable = piece.size() <= cache_max_word;
  if (cacheable) {
    std::lock_guard lock(cache_->mutex);
    if (const auto it = cache_->words.find(std::string(piece)); it != cache_->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<token_id> symbols;
  symbols.reserve(piece.size());
  for (char c : piece)
    if (const token_id id = byte_ids_[static_cast<unsigned char>(c)]; id >= 0)
      symbols.push_back(id);
  if (symbols.size() <= small_word)
    merge_small(symbols);
  else
    merge_large(symbols);
  out.insert(out.end(), symbols.begin(), symbols.end());
  if (cacheable) {
    std::lock_guard lock(cache_->mutex);
    if (cache_->words.size() < cache_max_entries)
      cache_->words.emplace(std::string(piece), std::move(symbols));
  }
}

} // namespace troupe::engine
