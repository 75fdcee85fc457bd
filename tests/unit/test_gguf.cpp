// The GGUF reader and dequantisation against llama.cpp's own Python package (`gguf` on PyPI):
// tests/data/gguf/quants.gguf and its expected values were written by make_testdata.py there.
// Also the malformed-file errors (bad magic, truncation, unknown or unsupported quant type) and
// the Hugging Face <-> llama.cpp tensor-name mapping.
#include <cmath>
#include <cstring>
#include <fstream>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/model/gguf.hpp"
#include "engine/model/gguf_weights.hpp"
#include "golden.hpp"
#include "safetensors_writer.hpp"

using namespace troupe;
using namespace troupe::engine;
namespace fs = std::filesystem;

namespace {

const fs::path data_dir = fs::path(TROUPE_TEST_DATA_DIR) / "gguf";

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot read " << p);
  return {std::istreambuf_iterator<char>(in), {}};
}

fs::path write_bytes(const fs::path& p, const std::vector<char>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
  return p;
}

std::string open_error(const fs::path& p) {
  auto r = gguf_file::open(p);
  REQUIRE_FALSE(r.has_value());
  return r.error().to_string();
}

// A minimal GGUF v3 image: no metadata, one 1-D tensor "t" of `n` elements of ggml type `type`.
std::vector<char> one_tensor_file(uint32_t type, uint64_t n, size_t data_bytes) {
  std::vector<char> b;
  auto put = [&](auto v) {
    const char* p = reinterpret_cast<const char*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  };
  put(uint32_t{0x46554747});
  put(uint32_t{3});
  put(uint64_t{1}); // tensors
  put(uint64_t{0}); // metadata
  put(uint64_t{1});
  b.push_back('t');
  put(uint32_t{1});
  put(n);
  put(type);
  put(uint64_t{0});
  b.resize((b.size() + 31) / 32 * 32, 0);
  b.resize(b.size() + data_bytes, 0);
  return b;
}

} // namespace

TEST_CASE("gguf: every supported type dequantises exactly as the gguf package does") {
  auto file = gguf_file::open(data_dir / "quants.gguf");
  REQUIRE_MESSAGE(file.has_value(), (file ? "" : file.error().to_string()));
  auto expected = test::read_json(data_dir / "quants.expected.json");
  auto raw = read_bytes(data_dir / "quants.expected.bin");
  std::vector<float> want(raw.size() / sizeof(float));
  std::memcpy(want.data(), raw.data(), want.size() * sizeof(float));
  CHECK(file->version() == 3);
  CHECK(file->alignment() == 64);
  REQUIRE(file->tensors().size() == expected["tensors"].size());
  for (auto& e : expected["tensors"]) {
    const std::string name = e["name"];
    INFO("tensor " << name << " (" << e["type"].get<std::string>() << ")");
    const gguf_tensor_info* t = file->find_tensor(name);
    REQUIRE(t != nullptr);
    CHECK(ggml_type_name(t->type) == e["type"].get<std::string>());
    CHECK(t->torch_shape() == e["shape"].get<std::vector<int64_t>>());
    auto got = file->dequantize(*t);
    REQUIRE(got.has_value());
    REQUIRE(static_cast<int64_t>(got->size()) == t->numel());
    size_t off = e["offset"];
    int mismatches = 0;
    for (size_t i = 0; i < got->size(); ++i)
      if (std::memcmp(&(*got)[i], &want[off + i], sizeof(float)) != 0 && mismatches++ < 3)
        MESSAGE("element " << i << ": " << (*got)[i] << " != " << want[off + i]);
    CHECK(mismatches == 0);
    // A row range is the same values as the whole.
    if (t->num_rows() > 1) {
      auto rows = file->dequantize_rows(*t, 1, 2);
      REQUIRE(rows.has_value());
      CHECK(std::equal(rows->begin(), rows->end(), got->begin() + t->row_size()));
    }
  }
}

TEST_CASE("gguf: metadata of every value type") {
  auto file = gguf_file::open(data_dir / "quants.gguf");
  REQUIRE(file.has_value());
  auto meta = test::read_json(data_dir / "quants.expected.json")["metadata"];
  for (auto& [key, v] : meta.items()) {
    INFO("key " << key);
    REQUIRE(file->find(key) != nullptr);
    if (v.is_boolean()) {
      CHECK(file->get_bool(key)->value() == v.get<bool>());
    } else if (v.is_number_integer()) {
      CHECK(file->get_int(key)->value() == v.get<int64_t>());
    } else if (v.is_number_float()) {
      CHECK(file->get_float(key)->value() == doctest::Approx(v.get<double>()).epsilon(1e-7));
    } else if (v.is_string()) {
      CHECK(file->get_string(key)->value() == v.get<std::string>());
    } else if (v[0].is_string()) {
      CHECK(file->get_strings(key)->value() == v.get<std::vector<std::string>>());
    } else if (v[0].is_number_integer()) {
      CHECK(file->get_ints(key)->value() == v.get<std::vector<int64_t>>());
    } else {
      auto got = std::get<std::vector<double>>(file->find(key)->value);
      CHECK(got == v.get<std::vector<double>>());
    }
  }
  CHECK_FALSE(file->get_int("absent.key")->has_value());
  auto wrong = file->get_int("test.string");
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().message().find("test.string is not an integer") != std::string::npos);
}

TEST_CASE("gguf: malformed files give errors that name the file and the problem") {
  test::temp_dir tmp;
  auto good = read_bytes(data_dir / "quants.gguf");

  auto bad_magic = good;
  bad_magic[0] = 'X';
  auto e = open_error(write_bytes(tmp.path() / "magic.gguf", bad_magic));
  CHECK(e.find("magic.gguf: not a GGUF file (bad magic") != std::string::npos);

  auto cut_data = good;
  cut_data.resize(good.size() - 100);
  e = open_error(write_bytes(tmp.path() / "cut.gguf", cut_data));
  CHECK(e.find("cut.gguf: truncated GGUF file: tensor vec_q8_0") != std::string::npos);

  auto cut_header = good;
  cut_header.resize(200);
  e = open_error(write_bytes(tmp.path() / "header.gguf", cut_header));
  CHECK(e.find("header.gguf: truncated GGUF file") != std::string::npos);

  e = open_error(write_bytes(tmp.path() / "unknown.gguf", one_tensor_file(99, 32, 64)));
  CHECK(e.find("unknown.gguf: tensor t has unknown ggml type 99") != std::string::npos);

  auto version = good;
  version[4] = 7;
  e = open_error(write_bytes(tmp.path() / "v7.gguf", version));
  CHECK(e.find("GGUF version 7 is not supported") != std::string::npos);

  // A known type we do not dequantise (Q5_K = 13): the file opens, loading names the type.
  auto q5k = gguf_file::open(write_bytes(tmp.path() / "q5k.gguf", one_tensor_file(13, 256, 176)));
  REQUIRE_MESSAGE(q5k.has_value(), (q5k ? "" : q5k.error().to_string()));
  auto load = q5k->dequantize(q5k->tensors()[0]);
  REQUIRE_FALSE(load.has_value());
  CHECK(load.error().message().find("tensor t has type Q5_K, which cannot be dequantised") !=
        std::string::npos);

  // Row lengths that are not whole blocks are rejected at open.
  e = open_error(write_bytes(tmp.path() / "partial.gguf", one_tensor_file(8, 40, 64)));
  CHECK(e.find("row of 40 is not a multiple of the block size 32") != std::string::npos);
}

TEST_CASE("gguf: Hugging Face tensor names map to llama.cpp names") {
  CHECK(gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight");
  CHECK(gguf_tensor_name("model.norm.weight") == "output_norm.weight");
  CHECK(gguf_tensor_name("lm_head.weight") == "output.weight");
  CHECK(gguf_tensor_name("model.layers.0.input_layernorm.weight") == "blk.0.attn_norm.weight");
  CHECK(gguf_tensor_name("model.layers.12.post_attention_layernorm.weight") ==
        "blk.12.ffn_norm.weight");
  CHECK(gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight");
  CHECK(gguf_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight");
  CHECK(gguf_tensor_name("model.layers.29.mlp.down_proj.weight") == "blk.29.ffn_down.weight");
  CHECK(gguf_tensor_name("model.layers.1.self_attn.k_proj.bias") == "blk.1.attn_k.bias");
  CHECK_FALSE(gguf_tensor_name("model.layers.x.mlp.up_proj.weight").has_value());
  CHECK_FALSE(gguf_tensor_name("model.layers.1.mlp.experts.0.up_proj.weight").has_value());
  CHECK_FALSE(gguf_tensor_name("model.rotary_emb.inv_freq").has_value());
}

TEST_CASE("gguf: a file without llama metadata is refused as a model") {
  auto file = gguf_file::open(data_dir / "quants.gguf");
  REQUIRE(file.has_value());
  auto c = gguf_model_config(*file);
  REQUIRE_FALSE(c.has_value());
  CHECK(c.error().message().find("GGUF architecture 'testarch' is not supported") !=
        std::string::npos);
  auto tok = read_gguf_tokenizer(*file);
  REQUIRE_FALSE(tok.has_value());
  CHECK(tok.error().message().find("tokenizer.ggml.model is missing") != std::string::npos);
}

TEST_CASE("gguf: a model path may name the .gguf file or a folder holding one") {
  test::temp_dir tmp;
  const auto src = data_dir / "quants.gguf";
  CHECK(gguf_model_file(src)->value() == src);
  CHECK_FALSE(gguf_model_file(tmp.path())->has_value()); // empty folder: not GGUF
  fs::copy_file(src, tmp.path() / "a.gguf");
  CHECK(gguf_model_file(tmp.path())->value() == tmp.path() / "a.gguf");
  // The backend takes the folder and reaches the file's own metadata.
  auto b = cpu_backend::load(tmp.path(), {});
  REQUIRE_FALSE(b.has_value());
  CHECK(b.error().message().find("a.gguf: GGUF architecture 'testarch' is not supported") !=
        std::string::npos);
  fs::copy_file(src, tmp.path() / "b.gguf");
  auto two = gguf_model_file(tmp.path());
  REQUIRE_FALSE(two.has_value());
  CHECK(two.error().message().find("several .gguf files and no config.json (a.gguf, b.gguf)") !=
        std::string::npos);
  test::write_text(tmp.path() / "config.json", "{}"); // a Hugging Face folder wins
  CHECK_FALSE(gguf_model_file(tmp.path())->has_value());
}

TEST_CASE("gguf: absurd counts in the header fail as truncation, without allocating them") {
  test::temp_dir tmp;
  std::vector<char> b;
  auto put = [&](auto v) {
    const char* p = reinterpret_cast<const char*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  };
  put(uint32_t{0x46554747});
  put(uint32_t{3});
  put(uint64_t{0}); // tensors
  put(uint64_t{1}); // metadata
  put(uint64_t{1});
  b.push_back('k');
  put(uint32_t{9});       // array
  put(uint32_t{0});       // of u8
  put(uint64_t{1} << 40); // claimed elements
  auto e = open_error(write_bytes(tmp.path() / "huge.gguf", b));
  CHECK(e.find("huge.gguf: truncated GGUF file: k at byte") != std::string::npos);
  CHECK(e.find("huge.gguf") == e.rfind("huge.gguf")); // the file named once

  b.resize(b.size() - 16); // same key, now of value type 42
  put(uint32_t{42});
  e = open_error(write_bytes(tmp.path() / "type.gguf", b));
  CHECK(e.find("type.gguf: k: unknown GGUF value type 42") != std::string::npos);
}

TEST_CASE("gguf: Q/K rows permuted by llama.cpp's converter come back in Hugging Face order") {
  // llama_qk.gguf: 4 heads, 2 kv heads, hidden 32, head_dim 8; Q/K weights and biases permuted
  // with convert_hf_to_gguf.py's LlamaModel.permute; the .bin holds the original values.
  auto w = gguf_weights::open(data_dir / "llama_qk.gguf");
  REQUIRE_MESSAGE(w.has_value(), (w ? "" : w.error().to_string()));
  auto raw = read_bytes(data_dir / "llama_qk.expected.bin");
  std::vector<float> want(raw.size() / sizeof(float));
  std::memcpy(want.data(), raw.data(), want.size() * sizeof(float));
  struct part {
    const char* name;
    std::vector<int64_t> shape;
  };
  const part parts[] = {{"model.layers.0.self_attn.q_proj.weight", {32, 32}},
                        {"model.layers.0.self_attn.q_proj.bias", {32}},
                        {"model.layers.0.self_attn.k_proj.weight", {16, 32}},
                        {"model.layers.0.self_attn.k_proj.bias", {16}}};
  size_t off = 0;
  for (const auto& p : parts) {
    INFO(p.name);
    auto got = w->load_f32(p.name, p.shape);
    REQUIRE(got.has_value());
    CHECK(std::equal(got->begin(), got->end(), want.begin() + static_cast<std::ptrdiff_t>(off)));
    // A row range of the permuted tensor (as a tensor-parallel rank asks for it).
    const int64_t cols = p.shape.size() == 2 ? p.shape[1] : 1;
    auto rows = w->load_f32_rows(p.name, p.shape, 5, 13);
    REQUIRE(rows.has_value());
    CHECK(std::equal(rows->begin(), rows->end(),
                     want.begin() + static_cast<std::ptrdiff_t>(off + 5 * cols)));
    off += got->size();
  }
  CHECK(off == want.size());
}
