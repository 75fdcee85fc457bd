// Text <-> token ids for byte-level BPE models, byte for byte as Hugging Face `tokenizers` does:
// added tokens matched first, optional NFC normalisation (utf8proc), regex pre-tokenisation
// (PCRE2), BPE with merge ranks, byte-level decoding. Built once at model load (tokenizer.json, or
// from parts by the GGUF importer); encode/decode are const, thread-safe, and do not block.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/tokenizer/bpe.hpp"
#include "engine/tokenizer/pre_tokenizer.hpp"
#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

// A token matched verbatim in the input before normalisation and BPE (e.g. "<|im_start|>").
// Tokens marked `normalized` in tokenizer.json are matched on the raw text too (HF matches them on
// NFC text; the same for the ASCII contents real models use). `single_word` is refused at load.
struct added_token {
  token_id id = -1;
  std::string content; // the literal text, UTF-8
  bool special = true; // dropped by decode(skip_special = true)
  bool lstrip = false; // a match also swallows the whitespace before it
  bool rstrip = false; // ... or after it
};

// Everything a tokenizer is made of, for callers without a tokenizer.json (the GGUF importer:
// `tokenizer.ggml.tokens`, `.merges`, `.token_type` give vocab, merges and added tokens).
struct tokenizer_parts {
  // id -> token string in the GPT-2 byte-level alphabet, as tokenizer.json and GGUF store them
  // ("Ġthe" for " the"). Ids that are added tokens may be left empty here.
  std::vector<std::string> vocab;
  // Merge rules in rank order, each pair in the byte-level alphabet ("Ġ", "t").
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<added_token> added_tokens; // special and not; ids may be inside or beyond vocab
  // Splitting steps in order, e.g. {preset_step(pre_tokenizer_preset::llama3)} or, for SmolLM2,
  // {digits_step(true), preset_step(pre_tokenizer_preset::gpt2)}.
  std::vector<split_step> pre_tokenizer;
  bool nfc = false;           // NFC-normalise text outside added tokens (Qwen2/3)
  bool ignore_merges = false; // a piece that is a whole vocabulary token is that token (Llama 3)
  bool add_prefix_space =
      false; // ByteLevel add_prefix_space: prefix " " to text not starting with one
};

split_step preset_step(pre_tokenizer_preset preset);
split_step regex_step(std::string pattern);
split_step digits_step(bool individual_digits);

class tokenizer {
 public:
  // Builds from parts; errors name the bad part (missing byte token, merge outside the vocab, ...).
  static expected<tokenizer> from_parts(tokenizer_parts parts);

  // Reads a Hugging Face tokenizer.json (following a git symlink stub: a short text file naming the
  // real file relative to its folder). Unsupported models (Unigram, WordPiece, SentencePiece-style
  // byte_fallback BPE, Metaspace) are errc::unsupported errors naming the type.
  static expected<tokenizer> from_file(const std::filesystem::path& path);
  static expected<tokenizer> from_json(std::string_view json_text, std::string_view what);

  // Token ids of `text` (valid UTF-8, else errc::invalid_argument) without BOS/EOS. Added tokens
  // in the text, special or not, are matched as tokens (HF's default).
  expected<std::vector<token_id>> encode(std::string_view text) const;

  // The text of `ids`. Unknown ids are skipped (as HF does); invalid UTF-8 from partial byte
  // tokens becomes U+FFFD exactly as HF's lossy decoding.
  std::string decode(std::span<const token_id> ids, bool skip_special = false) const;

  // Raw bytes a token stands for in decoded output (empty for unknown ids).
  std::string_view token_bytes(token_id id) const;
  bool is_special(token_id id) const;
  bool is_known(token_id id) const;
  // The id of an added token's content or of a vocabulary token written in the byte-level alphabet.
  std::optional<token_id> token_to_id(std::string_view token) const;
  // One more than the largest id (vocabulary and added tokens).
  int64_t size() const { return static_cast<int64_t>(bytes_.size()); }

 private:
  tokenizer() = default;
  void encode_plain(std::string_view text, std::vector<token_id>& out, std::string& scratch,
                    std::vector<std::string_view>& pieces) const;
  const added_token* match_added(std::string_view text, size_t pos) const;

  std::unique_ptr<bpe_model> bpe_;
  std::unique_ptr<pre_tokenizer> pre_;
  bool nfc_ = false;
  bool add_prefix_space_ = false;
  std::vector<added_token> added_; // longest content first
  bool added_first_byte_[256] = {};
  std::vector<std::string> bytes_; // id -> decoded bytes
  std::vector<uint8_t> flags_;     // id -> known(1) | special(2)
  std::unordered_map<std::string, token_id> added_by_content_;
};

} // namespace troupe::engine
