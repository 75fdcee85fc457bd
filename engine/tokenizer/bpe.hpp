// Byte-level BPE model: merges pieces of raw bytes into token ids by merge rank, as Hugging Face's
// BPE model does (lowest rank first, leftmost on ties). Owned by `tokenizer`; encode() is const and
// thread-safe (a mutex guards the word cache); it never blocks beyond that mutex.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

class bpe_model {
 public:
  // `vocab`: id -> raw bytes (empty for ids the model does not own); `merges` in rank order, as
  // pairs of raw byte strings. Every single byte must have a token; every merge's parts and result
  // must be in the vocabulary.
  static expected<bpe_model> create(const std::vector<std::string>& vocab,
                                    const std::vector<std::pair<std::string, std::string>>& merges,
                                    bool ignore_merges);

  // Appends the ids of one pre-tokenized piece (raw bytes, non-empty).
  void encode(std::string_view piece, std::vector<token_id>& out) const;

  // The id of an exact byte string in the vocabulary, or -1.
  token_id find(std::string_view bytes) const;

 private:
  struct merge_info {
    int32_t rank;
    token_id result;
  };
  struct word_cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<token_id>> words;
  };
  static uint64_t pair_key(token_id a, token_id b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const merge_info* find_merge(token_id a, token_id b) const;
  void merge_small(std::vector<token_id>& symbols) const;
  void merge_large(std::vector<token_id>& symbols) const;

  std::unordered_map<std::string, token_id> vocab_;
  std::unordered_map<uint64_t, merge_info> merges_;
  token_id byte_ids_[256] = {};
  bool ignore_merges_ = false;
  std::unique_ptr<word_cache> cache_ = std::make_unique<word_cache>();
};

} // namespace troupe::engine
