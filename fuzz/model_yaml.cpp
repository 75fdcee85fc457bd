// Fuzz harness: model.yaml text through parse_deployment (what `cluster serve` reads).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "runtime/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto c = troupe::parse_deployment(std::string_view(reinterpret_cast<const char*>(data), size),
                                    "model.yaml");
  if (c)
    (void)troupe::replica_groups(*c);
  else
    (void)c.error().message();
  return 0;
}
