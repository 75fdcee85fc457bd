// Fuzz harness: a safetensors file image through safetensors_file::parse (header JSON, dtypes,
// shapes, offsets), then every tensor's byte range read as a loader would.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = troupe::engine::safetensors_file::parse(troupe::fuzz::map_bytes(data, size),
                                                      "model.safetensors");
  if (!file)
    return 0;
  uint8_t sum = 0;
  for (const auto& t : file->tensors()) {
    (void)t.numel();
    const std::byte* p = file->data(t);
    for (size_t i = t.begin; i < t.end; i += 4096)
      sum ^= static_cast<uint8_t>(p[i - t.begin]);
  }
  (void)sum;
  return 0;
}
