// A model stored as one llama.cpp GGUF file: its weights behind the weight_source interface under
// Hugging Face names and PyTorch shapes (dequantised to float32), and its model_config from the
// GGUF metadata. Used by cpu_backend::load for `.gguf` paths. Loads block the calling thread and
// are safe to run concurrently.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "engine/model/gguf.hpp"
#include "engine/model/model_config.hpp"
#include "engine/model/safetensors.hpp"
#include "engine/model/weight_source.hpp"

namespace troupe::engine {

// The llama.cpp tensor name for a Hugging Face one ("model.layers.3.self_attn.q_proj.weight" ->
// "blk.3.attn_q.weight"), or nullopt for names without a GGUF counterpart.
std::optional<std::string> gguf_tensor_name(std::string_view hf_name);

// Which GGUF file a model path means: the path itself when it names a `.gguf` file; the one
// `.gguf` inside a folder that has no config.json; nullopt for a Hugging Face folder (or anything
// else, left to the safetensors loader). A folder with several .gguf files and no config.json
// is an error listing them.
expected<std::optional<std::filesystem::path>> gguf_model_file(const std::filesystem::path& path);

// model_config from `general.architecture` and its `<arch>.*` keys. Supports "llama" (the
// architecture of Llama 2/3, SmolLM, TinyLlama, Mistral-style GGUFs); other architectures and
// features we cannot reproduce (rope_freqs tensors, YaRN) are errors naming the key.
expected<model_config> gguf_model_config(const gguf_file& file);

// A model's config without its weights: config.json of a Hugging Face folder, or the metadata of
// the .gguf file the path means (gguf_model_file). Blocks on reading the file.
expected<model_config> peek_model_config(const std::filesystem::path& path);

class gguf_weights final : public weight_source {
 public:
  static expected<gguf_weights> open(const std::filesystem::path& path);
  explicit gguf_weights(gguf_file file);

  const gguf_file& file() const { return file_; }

  bool contains(std::string_view name) const override;
  expected<std::vector<float>> load_f32(std::string_view name,
                                        std::vector<int64_t> shape) const override;
  expected<std::vector<float>> load_f32_rows(std::string_view name, std::vector<int64_t> shape,
                                             int64_t row_begin, int64_t row_end) const override;
  expected<std::vector<float>> load_f32_cols(std::string_view name, std::vector<int64_t> shape,
                                             int64_t col_begin, int64_t col_end) const override;
  expected<uint64_t> read_bytes(const weight_slice& slice) const override;

 private:
  struct located {
    const gguf_tensor_info* info;
    int64_t rope_heads; // > 0: rows are in llama.cpp's rotary order for this many heads
  };
  expected<located> checked(std::string_view name, const std::vector<int64_t>& shape) const;

  gguf_file file_;
  int64_t num_heads_ = 0, num_kv_heads_ = 0; // for undoing the Q/K row permutation
};

// Opens a model path as every backend loader does (the .gguf file it means, else a Hugging Face
// folder of config.json and safetensors) and returns make(config, weights) while the weights are
// open. Blocks on reading the files.
template <class Make>
auto open_model(const std::filesystem::path& path, Make&& make)
    -> decltype(make(std::declval<model_config>(), std::declval<const weight_source&>())) {
  auto gguf = gguf_model_file(path);
  if (!gguf)
    return std::move(gguf).error();
  if (*gguf) {
    auto weights = gguf_weights::open(**gguf);
    if (!weights)
      return std::move(weights).error();
    auto config = gguf_model_config(weights->file());
    if (!config)
      return std::move(config).error();
    return make(std::move(*config), *weights);
  }
  auto config = load_model_config(path);
  if (!config)
    return std::move(config).error();
  auto weights = weight_store::open(path);
  if (!weights)
    return std::move(weights).error();
  return make(std::move(*config), *weights);
}

} // namespace troupe::engine
