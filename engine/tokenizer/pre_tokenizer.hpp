// Pre-tokenizers: split normalised text into pieces that BPE encodes independently. Regex splits
// run on PCRE2 (UTF + UCP, JIT-compiled), matching Hugging Face's `Split` with behaviour
// `Isolated`. Built once at load by the tokenizer; split() is const, thread-safe and never blocks.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine {

// The splitting regexes of well-known byte-level BPE tokenizers.
enum class pre_tokenizer_preset : uint8_t {
  gpt2,   // 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ (ByteLevel use_regex=true)
  llama3, // case-insensitive contractions, \p{N}{1,3}, newline handling (Llama 3, SmolLM-style)
  qwen2,  // as llama3 but single digits \p{N} (Qwen2, Qwen2.5, Qwen3)
};

std::string_view preset_regex(pre_tokenizer_preset preset);

// One splitting step.
struct split_step {
  enum class kind : uint8_t { regex, digits };
  kind type = kind::regex;
  std::string pattern;            // regex: PCRE2 syntax (HF patterns work unchanged)
  bool individual_digits = false; // digits: each digit alone, else runs of digits
};

class pre_tokenizer {
 public:
  // Compiles every regex step; a pattern PCRE2 rejects is an error naming it and the offset.
  static expected<pre_tokenizer> create(std::vector<split_step> steps);

  pre_tokenizer(pre_tokenizer&&) noexcept;
  pre_tokenizer& operator=(pre_tokenizer&&) noexcept;
  ~pre_tokenizer();

  // Pieces of `text` (valid UTF-8) in order, covering it exactly. Each step splits the pieces of
  // the previous one: regex matches and the gaps between them become pieces.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;

  const std::vector<split_step>& steps() const { return steps_; }

 private:
  struct compiled;
  pre_tokenizer() = default;
  std::vector<split_step> steps_;
  std::vector<std::unique_ptr<compiled>> compiled_; // one per step (null for digits)
};

} // namespace troupe::engine
