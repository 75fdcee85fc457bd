#include "engine/tokenizer/utf8.hpp"

#include <unordered_map>

namespace troupe::engine::utf8 {

namespace {

// Length of a valid sequence starting at s[i], 0 when invalid there. `incomplete` is set when the
// bytes so far are a valid prefix cut short by the end of the input. `bad_len` is the maximal
// invalid subpart length (at least 1) when invalid.
size_t sequence_at(std::string_view s, size_t i, bool& incomplete, size_t& bad_len) {
  incomplete = false;
  bad_len = 1;
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80)
    return 1;
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0)
      lo = 0xA0;
    if (b0 == 0xED)
      hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0)
      lo = 0x90;
    if (b0 == 0xF4)
      hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) {
      incomplete = true;
      bad_len = k;
      return 0;
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      bad_len = k;
      return 0;
    }
  }
  return need + 1;
}

} // namespace

size_t valid_prefix(std::string_view bytes) {
  size_t i = 0;
  bool incomplete = false;
  size_t bad = 0;
  while (i < bytes.size()) {
    const size_t n = sequence_at(bytes, i, incomplete, bad);
    if (n == 0)
      break;
    i += n;
  }
  return i;
}

size_t append_lossy(std::string& out, std::string_view bytes, bool final_chunk) {
  size_t i = 0;
  bool incomplete = false;
  size_t bad = 0;
  while (i < bytes.size()) {
    const size_t n = sequence_at(bytes, i, incomplete, bad);
    if (n > 0) {
      out.append(bytes.substr(i, n));
      i += n;
      continue;
    }
    if (incomplete && !final_chunk)
      return i;
    out.append("\xEF\xBF\xBD");
    i += bad;
  }
  return i;
}

void append_code_point(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

const std::array<char32_t, 256>& byte_to_char() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

std::string byte_level_decode(std::string_view token) {
  static const std::unordered_map<char32_t, unsigned char> reverse = [] {
    std::unordered_map<char32_t, unsigned char> r;
    const auto& t = byte_to_char();
    for (int b = 0; b < 256; ++b)
      r.emplace(t[b], static_cast<unsigned char>(b));
    return r;
  }();
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  bool incomplete = false;
  size_t bad = 0;
  while (i < token.size()) {
    const size_t n = sequence_at(token, i, incomplete, bad);
    if (n == 0)
      return std::string(token);
    char32_t cp = static_cast<unsigned char>(token[i]);
    if (n > 1) {
      cp &= (0xFF >> (n + 1));
      for (size_t k = 1; k < n; ++k)
        cp = (cp << 6) | (static_cast<unsigned char>(token[i + k]) & 0x3F);
    }
    auto it = reverse.find(cp);
    if (it == reverse.end())
      return std::string(token);
    out.push_back(static_cast<char>(it->second));
    i += n;
  }
  return out;
}

std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  const auto& t = byte_to_char();
  for (char c : bytes)
    append_code_point(out, t[static_cast<unsigned char>(c)]);
  return out;
}

} // namespace troupe::engine::utf8
