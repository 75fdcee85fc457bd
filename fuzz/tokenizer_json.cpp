// Fuzz harness: tokenizer.json text through tokenizer::from_json, then a round trip of a fixed
// text and of the input itself (up to 256 bytes) through encode and decode.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/tokenizer/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto tok = troupe::engine::tokenizer::from_json(text, "tokenizer.json");
  if (!tok)
    return 0;
  for (std::string_view s : {std::string_view("Hello, world! 123 <|im_end|>"), text.substr(0, 256)})
    if (auto ids = tok->encode(s))
      (void)tok->decode(*ids, true);
  return 0;
}
