#include "safetensors_writer.hpp"

#include <cstring>
#include <fstream>
#include <random>

namespace troupe::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

raw_tensor f32_tensor(std::string name, std::vector<int64_t> shape, const std::vector<float>& v) {
  raw_tensor t{std::move(name), "F32", std::move(shape), {}};
  t.bytes.resize(v.size() * 4);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

json safetensors_header(const std::vector<raw_tensor>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  header["__metadata__"] = {{"format", "pt"}};
  return header;
}

void write_raw_safetensors(const fs::path& path, const std::string& header,
                           const std::vector<uint8_t>& data, uint64_t header_len_override) {
  std::ofstream out(path, std::ios::binary);
  uint64_t len = header_len_override != 0 ? header_len_override : header.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

void write_safetensors(const fs::path& path, const std::vector<raw_tensor>& tensors) {
  std::vector<uint8_t> data;
  for (const auto& t : tensors)
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
  write_raw_safetensors(path, safetensors_header(tensors).dump(), data);
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

json tiny_llama::config() const {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"vocab_size", vocab},
          {"hidden_size", hidden},
          {"intermediate_size", intermediate},
          {"num_hidden_layers", layers},
          {"num_attention_heads", heads},
          {"num_key_value_heads", kv_heads},
          {"head_dim", head_dim},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0},
          {"max_position_embeddings", 256},
          {"tie_word_embeddings", false},
          {"eos_token_id", 2}};
}

std::vector<raw_tensor> tiny_llama::tensors(uint32_t seed) const {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.3f);
  auto random = [&](std::string name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape)
      n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v)
      x = dist(rng);
    return f32_tensor(std::move(name), std::move(shape), v);
  };
  auto ones = [&](std::string name, int64_t n) {
    return f32_tensor(std::move(name), {n}, std::vector<float>(static_cast<size_t>(n), 1.0f));
  };
  std::vector<raw_tensor> t;
  t.push_back(random("model.embed_tokens.weight", {vocab, hidden}));
  t.push_back(random("lm_head.weight", {vocab, hidden}));
  t.push_back(ones("model.norm.weight", hidden));
  for (int64_t l = 0; l < layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back(ones(p + "input_layernorm.weight", hidden));
    t.push_back(ones(p + "post_attention_layernorm.weight", hidden));
    t.push_back(random(p + "self_attn.q_proj.weight", {heads * head_dim, hidden}));
    t.push_back(random(p + "self_attn.k_proj.weight", {kv_heads * head_dim, hidden}));
    t.push_back(random(p + "self_attn.v_proj.weight", {kv_heads * head_dim, hidden}));
    t.push_back(random(p + "self_attn.o_proj.weight", {hidden, heads * head_dim}));
    t.push_back(random(p + "mlp.gate_proj.weight", {intermediate, hidden}));
    t.push_back(random(p + "mlp.up_proj.weight", {intermediate, hidden}));
    t.push_back(random(p + "mlp.down_proj.weight", {hidden, intermediate}));
  }
  return t;
}

void tiny_llama::write(const fs::path& dir, bool sharded, uint32_t seed) const {
  fs::create_directories(dir);
  write_text(dir / "config.json", config().dump(2));
  auto all = tensors(seed);
  if (!sharded) {
    write_safetensors(dir / "model.safetensors", all);
    return;
  }
  std::vector<raw_tensor> a(all.begin(), all.begin() + static_cast<long>(all.size() / 2));
  std::vector<raw_tensor> b(all.begin() + static_cast<long>(all.size() / 2), all.end());
  write_safetensors(dir / "model-00001-of-00002.safetensors", a);
  write_safetensors(dir / "model-00002-of-00002.safetensors", b);
  json index = {{"metadata", json::object()}, {"weight_map", json::object()}};
  for (const auto& t : a)
    index["weight_map"][t.name] = "model-00001-of-00002.safetensors";
  for (const auto& t : b)
    index["weight_map"][t.name] = "model-00002-of-00002.safetensors";
  write_text(dir / "model.safetensors.index.json", index.dump(2));
}

} // namespace troupe::test
