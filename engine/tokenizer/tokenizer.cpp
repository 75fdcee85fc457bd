#include "engine/tokenizer/tokenizer.hpp"

#include <algorithm>
#include <cstdlib>

#include <utf8proc.h>

#include "engine/tokenizer/utf8.hpp"

namespace troupe::engine {

namespace {
constexpr uint8_t flag_known = 1, flag_special = 2;

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80)
      return false;
  return true;
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
} // namespace

split_step preset_step(pre_tokenizer_preset preset) {
  return split_step{.type = split_step::kind::regex, .pattern = std::string(preset_regex(preset))};
}
split_step regex_step(std::string pattern) {
  return split_step{.type = split_step::kind::regex, .pattern = std::move(pattern)};
}
split_step digits_step(bool individual_digits) {
  return split_step{.type = split_step::kind::digits, .individual_digits = individual_digits};
}

expected<tokenizer> tokenizer::from_parts(tokenizer_parts parts) {
  tokenizer t;
  size_t size = parts.vocab.size();
  for (const auto& a : parts.added_tokens) {
    if (a.id < 0 || a.content.empty())
      return make_error(errc::invalid_argument,
                        "added token '{}' has id {} (must be >= 0, non-empty)", a.content, a.id);
    size = std::max(size, static_cast<size_t>(a.id) + 1);
  }
  std::vector<std::string> raw(parts.vocab.size());
  t.bytes_.resize(size);
  t.flags_.assign(size, 0);
  for (size_t id = 0; id < parts.vocab.size(); ++id) {
    if (parts.vocab[id].empty())
      continue;
    raw[id] = utf8::byte_level_decode(parts.vocab[id]);
    t.bytes_[id] = raw[id];
    t.flags_[id] = flag_known;
  }
  // Added tokens decode through the same ByteLevel rule; they take precedence over the vocab for
  // decoding, and stay in the BPE vocabulary (as in HF, where merges may reach them).
  for (const auto& a : parts.added_tokens) {
    t.bytes_[a.id] = utf8::byte_level_decode(a.content);
    t.flags_[a.id] = flag_known | (a.special ? flag_special : 0);
    t.added_by_content_[a.content] = a.id;
    t.added_first_byte_[static_cast<unsigned char>(a.content[0])] = true;
  }
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(parts.merges.size());
  for (const auto& [a, b] : parts.merges)
    merges.emplace_back(utf8::byte_level_decode(a), utf8::byte_level_decode(b));
  auto bpe = bpe_model::create(raw, merges, parts.ignore_merges);
  if (!bpe)
    return std::move(bpe).error();
  t.bpe_ = std::make_unique<bpe_model>(std::move(*bpe));
  auto pre = pre_tokenizer::create(std::move(parts.pre_tokenizer));
  if (!pre)
    return std::move(pre).error();
  t.pre_ = std::make_unique<pre_tokenizer>(std::move(*pre));
  t.added_ = std::move(parts.added_tokens);
  std::stable_sort(t.added_.begin(), t.added_.end(), [](const auto& a, const auto& b) {
    return a.content.size() > b.content.size();
  });
  t.nfc_ = parts.nfc;
  t.add_prefix_space_ = parts.add_prefix_space;
  return t;
}

const added_token* tokenizer::match_added(std::string_view text, size_t pos) const {
  if (!added_first_byte_[static_cast<unsigned char>(text[pos])])
    return nullptr;
  for (const auto& a : added_) // longest first
    if (text.compare(pos, a.content.size(), a.content) == 0)
      return &a;
  return nullptr;
}

void tokenizer::encode_plain(std::string_view text, std::vector<token_id>& out,
                             std::string& scratch, std::vector<std::string_view>& pieces) const {
  if (text.empty())
    return;
  if (nfc_ && !is_ascii(text)) {
    utf8proc_uint8_t* mapped = nullptr;
    const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                static_cast<utf8proc_ssize_t>(text.size()), &mapped,
                                static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n >= 0) { // text was validated, so this cannot fail short of memory
      scratch.assign(reinterpret_cast<const char*>(mapped), static_cast<size_t>(n));
      text = scratch;
    }
    std::free(mapped);
  }
  if (add_prefix_space_ && text.front() != ' ') {
    std::string prefixed;
    prefixed.reserve(text.size() + 1);
    prefixed.append(" ").append(text);
    scratch = std::move(prefixed);
    text = scratch;
  }
  pre_->split(text, pieces);
  for (auto piece : pieces)
    bpe_->encode(piece, out);
}

expected<std::vector<token_id>> tokenizer::encode(std::string_view text) const {
  if (utf8::valid_prefix(text) != text.size())
    return make_error(errc::invalid_argument, "text to tokenize is not valid UTF-8 (byte {})",
                      utf8::valid_prefix(text));
  std::vector<token_id> out;
  out.reserve(text.size() / 3 + 4);
  std::string scratch;
  std::vector<std::string_view> pieces;
  size_t start = 0; // start of the pending plain segment
  size_t pos = 0;
  while (pos < text.size()) {
    const added_token* a = match_added(text, pos);
    if (a == nullptr) {
      ++pos;
      continue;
    }
    size_t seg_end = pos, next = pos + a->content.size();
    if (a->lstrip)
      while (seg_end > start && is_space(text[seg_end - 1]))
        --seg_end;
    if (a->rstrip)
      while (next < text.size() && is_space(text[next]))
        ++next;
    encode_plain(text.substr(start, seg_end - start), out, scratch, pieces);
    out.push_back(a->id);
    start = pos = next;
  }
  encode_plain(text.substr(start), out, scratch, pieces);
  return out;
}

std::string tokenizer::decode(std::span<const token_id> ids, bool skip_special) const {
  std::string raw;
  for (const token_id id : ids) {
    if (!is_known(id) || (skip_special && is_special(id)))
      continue;
    raw.append(bytes_[id]);
  }
  std::string out;
  out.reserve(raw.size());
  utf8::append_lossy(out, raw);
  return out;
}

std::string_view tokenizer::token_bytes(token_id id) const {
  return is_known(id) ? std::string_view(bytes_[id]) : std::string_view();
}

bool tokenizer::is_known(token_id id) const {
  return id >= 0 && static_cast<size_t>(id) < flags_.size() && (flags_[id] & flag_known) != 0;
}

bool tokenizer::is_special(token_id id) const {
  return is_known(id) && (flags_[id] & flag_special) != 0;
}

std::optional<token_id> tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = added_by_content_.find(std::string(token)); it != added_by_content_.end())
    return it->second;
  if (const token_id id = bpe_->find(utf8::byte_level_decode(token)); id >= 0)
    return id;
  return std::nullopt;
}

} // namespace troupe::engine
