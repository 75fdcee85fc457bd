// Jinja subset: template segmentation (whitespace control, trim_blocks, lstrip_blocks), expression
// tokens, and a recursive-descent parser with Jinja's operator precedence.
#include <cctype>

#include "engine/tokenizer/jinja.hpp"
#include "engine/tokenizer/jinja_lex.hpp"

namespace troupe::engine::jinja {

namespace {

int line_of(std::string_view src, size_t pos) {
  int line = 1;
  for (size_t i = 0; i < pos && i < src.size(); ++i)
    line += src[i] == '\n';
  return line;
}

// Finds `closer` after `from`, skipping quoted strings.
size_t find_closer(std::string_view src, size_t from, std::string_view closer) {
  char quote = 0;
  for (size_t i = from; i < src.size(); ++i) {
    const char c = src[i];
    if (quote) {
      if (c == '\\')
        ++i;
      else if (c == quote)
        quote = 0;
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (src.compare(i, closer.size(), closer) == 0) {
      return i;
    }
  }
  return std::string_view::npos;
}

} // namespace

expected<std::vector<segment>> segment_source(std::string_view src) {
  std::vector<segment> out;
  size_t pos = 0;
  bool strip_next = false, trim_newline = false;
  auto push_text = [&](std::string text) {
    if (trim_newline && !text.empty() && text[0] == '\n')
      text.erase(0, 1);
    else if (trim_newline && text.rfind("\r\n", 0) == 0)
      text.erase(0, 2);
    if (strip_next) {
      const auto b = text.find_first_not_of(" \t\r\n");
      text.erase(0, b == std::string::npos ? text.size() : b);
    }
    strip_next = trim_newline = false;
    out.push_back({segment::type::text, std::move(text), 0});
  };
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string_view::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open == std::string_view::npos || open + 1 >= src.size()) {
      push_text(std::string(src.substr(pos)));
      break;
    }
    const char kind = src[open + 1];
    push_text(std::string(src.substr(pos, open - pos)));
    std::string& prev = out.back().body;
    const bool minus = open + 2 < src.size() && src[open + 2] == '-';
    const bool plus = open + 2 < src.size() && src[open + 2] == '+';
    if (minus) {
      prev.erase(prev.find_last_not_of(" \t\r\n") + 1);
    } else if (kind != '{' && !plus) { // lstrip_blocks: spaces and tabs from a line start
      const auto nl = prev.find_last_of('\n');
      const size_t line_start = nl == std::string::npos ? 0 : nl + 1;
      if ((nl != std::string::npos || out.size() == 1) &&
          prev.find_first_not_of(" \t", line_start) == std::string::npos)
        prev.erase(line_start);
    }
    const std::string_view closer = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t body_start = open + 2 + (minus || plus);
    const size_t close = find_closer(src, body_start, closer);
    if (close == std::string_view::npos)
      return make_error(errc::parse_error, "chat template line {}: unclosed '{{{}'",
                        line_of(src, open), kind);
    const bool close_minus = close > body_start && src[close - 1] == '-';
    const std::string body(src.substr(body_start, close - body_start - close_minus));
    if (kind != '#')
      out.push_back({kind == '{' ? segment::type::output : segment::type::statement, body,
                     line_of(src, open)});
    strip_next = close_minus;
    trim_newline = kind != '{' && !close_minus && !(close > body_start && src[close - 1] == '+');
    pos = close + 2;
  }
  // keep_trailing_newline=False: Jinja drops one newline at the very end of the template.
  if (!out.empty() && out.back().kind == segment::type::text) {
    auto& t = out.back().body;
    if (!t.empty() && t.back() == '\n')
      t.pop_back();
  }
  return out;
}

expected<std::vector<token>> lex(const std::string& s, int line) {
  std::vector<token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_'))
        ++j;
      out.push_back({token::type::name, s.substr(i, j - i)});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) ||
                              (s[j] == '.' && !is_float && j + 1 < s.size() &&
                               std::isdigit(static_cast<unsigned char>(s[j + 1])))))
        is_float |= s[j++] == '.';
      out.push_back({is_float ? token::type::number : token::type::integer, s.substr(i, j - i)});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string text;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] != '\\' || j + 1 >= s.size()) {
          text.push_back(s[j]);
          continue;
        }
        const char e = s[++j];
        text.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e);
      }
      if (j >= s.size())
        return make_error(errc::parse_error, "chat template line {}: unterminated string", line);
      out.push_back({token::type::string, std::move(text)});
      i = j + 1;
    } else {
      static const char* ops[] = {"==", "!=", "<=", ">=", "//", "**", "<", ">", "+",
                                  "-",  "*",  "/",  "%",  "~",  "|",  ".", ",", ":",
                                  "(",  ")",  "[",  "]",  "{",  "}",  "="};
      bool found = false;
      for (const char* op : ops) {
        const std::string_view o(op);
        if (s.compare(i, o.size(), o) == 0) {
          out.push_back({token::type::op, std::string(o)});
          i += o.size();
          found = true;
          break;
        }
      }
      if (!found)
        return make_error(errc::parse_error, "chat template line {}: unexpected character '{}'",
                          line, c);
    }
  }
  out.push_back({token::type::end, ""});
  return out;
}

} // namespace troupe::engine::jinja
