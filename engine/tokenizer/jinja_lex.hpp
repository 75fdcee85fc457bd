// Jinja subset, first stage: the template cut into text, {{ output }} and {% statement %} segments
// (comments and whitespace control applied), and a tag's body cut into tokens. Internal.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine::jinja {

struct segment {
  enum class type : uint8_t { text, output, statement } kind;
  std::string body;
  int line;
};

struct token {
  enum class type : uint8_t { name, string, integer, number, op, end } kind;
  std::string text;
};

// With transformers' settings: trim_blocks, lstrip_blocks, no trailing newline kept.
expected<std::vector<segment>> segment_source(std::string_view src);
expected<std::vector<token>> lex(const std::string& body, int line);

} // namespace troupe::engine::jinja
