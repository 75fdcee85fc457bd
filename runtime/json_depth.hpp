// The nesting limit for JSON from outside (request bodies, model files): checked on the text
// before a parser builds anything, so no recursive walk (dump, copy, comparison, template
// rendering) ever sees attacker-chosen depth. Header-only; called by http/ and engine/ readers.
#pragma once

#include <cstddef>
#include <string_view>

namespace troupe {

// Request bodies and model files nest a few levels; real tokenizer.json and JSON schemas stay
// well under this.
inline constexpr int max_json_depth = 64;

// True when `text` nests arrays and objects at most `limit` deep (brackets inside strings are
// text). Invalid JSON may pass; the parser refuses it.
inline bool json_nesting_within(std::string_view text, int limit = max_json_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit)
        return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

} // namespace troupe
