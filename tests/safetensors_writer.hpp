// Writes small safetensors files and model folders for tests (valid or deliberately broken).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace troupe::test {

struct raw_tensor {
  std::string name;
  std::string dtype = "F32";
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

raw_tensor f32_tensor(std::string name, std::vector<int64_t> shape, const std::vector<float>& v);

// Header JSON for `tensors` laid out back to back in the order given.
nlohmann::json safetensors_header(const std::vector<raw_tensor>& tensors);
// 8-byte length + header text + data, exactly as written.
void write_raw_safetensors(const std::filesystem::path& path, const std::string& header,
                           const std::vector<uint8_t>& data, uint64_t header_len_override = 0);
void write_safetensors(const std::filesystem::path& path, const std::vector<raw_tensor>& tensors);
void write_text(const std::filesystem::path& path, const std::string& text);

// A tiny random Llama model folder: config.json + model.safetensors (or two shards + index).
struct tiny_llama {
  int64_t vocab = 32, hidden = 16, layers = 2, heads = 4, kv_heads = 2, head_dim = 4,
          intermediate = 24;
  nlohmann::json config() const;
  std::vector<raw_tensor> tensors(uint32_t seed) const;
  void write(const std::filesystem::path& dir, bool sharded, uint32_t seed = 7) const;
};

} // namespace troupe::test
