// Fuzz harness: a Hugging Face config.json through parse_model_config (the head and every
// loader read it), then what placement derives from it.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/model/model_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto c = troupe::engine::parse_model_config(
      std::string_view(reinterpret_cast<const char*>(data), size), "config.json");
  if (c) {
    (void)c->q_size();
    (void)c->kv_size();
    (void)c->is_moe_layer(0);
  } else {
    (void)c.error().message();
  }
  return 0;
}
