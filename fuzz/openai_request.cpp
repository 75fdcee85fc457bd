// Fuzz harness: OpenAI request bodies. Input: the route on the first line
// ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"), the JSON body after it.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/openai_dispatch.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const auto nl = in.find('\n');
  if (nl == std::string_view::npos)
    return 0;
  troupe::fuzz::dispatch_body(in.substr(0, nl), std::string(in.substr(nl + 1)));
  return 0;
}
