// UTF-8 helpers and the GPT-2 byte-level alphabet shared by the tokenizer, its decoder and the
// streaming detokenizer. Pure functions; none block.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace troupe::engine::utf8 {

// Length of the longest prefix of `bytes` that is valid UTF-8 (whole characters only).
size_t valid_prefix(std::string_view bytes);

// Appends `bytes` to `out`, replacing each maximal invalid subpart with U+FFFD exactly as Rust's
// String::from_utf8_lossy (and so Hugging Face decode) does. When `final_chunk` is false, a
// trailing sequence that may still become a character is not consumed; the return value is how many
// bytes of `bytes` were consumed (always all of them when final_chunk is true).
size_t append_lossy(std::string& out, std::string_view bytes, bool final_chunk = true);

// Appends the UTF-8 encoding of a code point.
void append_code_point(std::string& out, char32_t cp);

// GPT-2 byte-level alphabet: every byte has a printable code point standing in for it.
const std::array<char32_t, 256>& byte_to_char();

// Decodes a byte-level token string (e.g. "Ġhello") to raw bytes the way the ByteLevel decoder
// does: when every character is in the alphabet, the bytes it stands for; otherwise the string's
// own UTF-8.
std::string byte_level_decode(std::string_view token);

// Encodes raw bytes into the byte-level alphabet (the inverse of byte_level_decode).
std::string byte_level_encode(std::string_view bytes);

} // namespace troupe::engine::utf8
