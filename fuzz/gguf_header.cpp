// Fuzz harness: a GGUF file image through gguf_file::parse (metadata, tensor infos, offsets),
// then what loaders read from it: the model config, the tokenizer (and its chat template), and
// each tensor's first rows dequantised.
#include <cstddef>
#include <cstdint>

#include "engine/model/gguf.hpp"
#include "engine/model/gguf_weights.hpp"
#include "fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace troupe::engine;
  auto file = gguf_file::parse(troupe::fuzz::map_bytes(data, size), "model.gguf");
  if (!file)
    return 0;
  (void)gguf_model_config(*file);
  if (auto tok = read_gguf_tokenizer(*file))
    (void)model_tokenizer::from_gguf(*tok);
  for (const auto& t : file->tensors())
    (void)file->dequantize_rows(t, 0, std::min<int64_t>(t.num_rows(), 2));
  return 0;
}
