#define PCRE2_CODE_UNIT_WIDTH 8
#include "engine/tokenizer/pre_tokenizer.hpp"

#include <pcre2.h>

namespace troupe::engine {

std::string_view preset_regex(pre_tokenizer_preset preset) {
  switch (preset) {
  case pre_tokenizer_preset::gpt2:
    return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  case pre_tokenizer_preset::llama3:
    return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  case pre_tokenizer_preset::qwen2:
    return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  }
  return {};
}

namespace {

// Hugging Face compiles these patterns with Oniguruma, whose \s is exactly Unicode White_Space;
// PCRE2's \s (UCP) also matches U+180E (Mongolian vowel separator). Spell the class out to agree.
constexpr std::string_view white_space = "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{"
                                         "2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
                                         "\\x{205F}\\x{3000}";

std::string onig_compatible(std::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char n = pattern[++i];
      if (n == 's')
        out += in_class ? std::string(white_space) : "[" + std::string(white_space) + "]";
      else if (n == 'S' && !in_class)
        out += "[^" + std::string(white_space) + "]";
      else
        out.append(1, c).append(1, n);
      continue;
    }
    if (c == '[' && !in_class)
      in_class = true;
    else if (c == ']' && in_class && out.back() != '[' && out.back() != '^')
      in_class = false;
    out.push_back(c);
  }
  return out;
}

} // namespace

struct pre_tokenizer::compiled {
  pcre2_code* code = nullptr;
  ~compiled() { pcre2_code_free(code); }
};

pre_tokenizer::pre_tokenizer(pre_tokenizer&&) noexcept = default;
pre_tokenizer& pre_tokenizer::operator=(pre_tokenizer&&) noexcept = default;
pre_tokenizer::~pre_tokenizer() = default;

expected<pre_tokenizer> pre_tokenizer::create(std::vector<split_step> steps) {
  pre_tokenizer p;
  for (const auto& step : steps) {
    if (step.type != split_step::kind::regex) {
      p.compiled_.push_back(nullptr);
      continue;
    }
    int code = 0;
    PCRE2_SIZE offset = 0;
    auto c = std::make_unique<compiled>();
    const std::string pattern = onig_compatible(step.pattern);
    c->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                            PCRE2_UTF | PCRE2_UCP, &code, &offset, nullptr);
    if (c->code == nullptr) {
      PCRE2_UCHAR buffer[256];
      pcre2_get_error_message(code, buffer, sizeof buffer);
      return make_error(errc::parse_error, "pre-tokenizer regex '{}': {} at offset {}",
                        step.pattern, reinterpret_cast<const char*>(buffer), offset);
    }
    pcre2_jit_compile(c->code, PCRE2_JIT_COMPLETE); // falls back to the interpreter without JIT
    p.compiled_.push_back(std::move(c));
  }
  p.steps_ = std::move(steps);
  return p;
}

namespace {

void split_regex(pcre2_code* code, pcre2_match_data* md, std::string_view text,
                 std::vector<std::string_view>& out) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0, gap_start = 0;
  while (pos < text.size()) {
    const int rc = pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0)
      break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t start = ov[0], end = ov[1];
    if (end == start) { // an empty match: step over one character
      pos = start + 1;
      while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80)
        ++pos;
      continue;
    }
    if (start > gap_start)
      out.push_back(text.substr(gap_start, start - gap_start));
    out.push_back(text.substr(start, end - start));
    pos = gap_start = end;
  }
  if (gap_start < text.size())
    out.push_back(text.substr(gap_start));
}

void split_digits(bool individual, std::string_view text, std::vector<std::string_view>& out) {
  auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i + 1;
    if (is_digit(text[i])) {
      if (!individual)
        while (j < text.size() && is_digit(text[j]))
          ++j;
    } else {
      while (j < text.size() && !is_digit(text[j]))
        ++j;
    }
    out.push_back(text.substr(i, j - i));
    i = j;
  }
}

} // namespace

void pre_tokenizer::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  pieces.clear();
  if (text.empty())
    return;
  pieces.push_back(text);
  std::vector<std::string_view> next;
  for (size_t s = 0; s < steps_.size(); ++s) {
    next.clear();
    pcre2_match_data* md = nullptr;
    if (compiled_[s])
      md = pcre2_match_data_create_from_pattern(compiled_[s]->code, nullptr);
    for (auto piece : pieces) {
      if (compiled_[s])
        split_regex(compiled_[s]->code, md, piece, next);
      else
        split_digits(steps_[s].individual_digits, piece, next);
    }
    pcre2_match_data_free(md);
    pieces.swap(next);
  }
}

} // namespace troupe::engine
