// The safetensors reader: valid single and sharded folders, and every malformed-file case named
// in the foundation issue, each asserting that the error names the file and the problem.
#include <cstring>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/model/safetensors.hpp"
#include "golden.hpp"
#include "safetensors_writer.hpp"

using namespace troupe;
using namespace troupe::engine;
namespace fs = std::filesystem;

namespace {

std::string open_error(const fs::path& p) {
  auto r = safetensors_file::open(p);
  REQUIRE_FALSE(r.has_value());
  return r.error().to_string();
}

std::vector<test::raw_tensor> two_tensors() {
  return {test::f32_tensor("a", {2, 3}, {1, 2, 3, 4, 5, 6}), test::f32_tensor("b", {2}, {7, 8})};
}

std::vector<uint8_t> data_of(const std::vector<test::raw_tensor>& ts) {
  std::vector<uint8_t> d;
  for (auto& t : ts)
    d.insert(d.end(), t.bytes.begin(), t.bytes.end());
  return d;
}

} // namespace

TEST_CASE("safetensors: reads tensors, shapes and row/column slices") {
  test::temp_dir tmp;
  auto path = tmp.path() / "w.safetensors";
  test::write_safetensors(path, two_tensors());
  auto store = weight_store::open(path);
  REQUIRE_MESSAGE(store.has_value(), (store ? "" : store.error().to_string()));
  CHECK(store->num_tensors() == 2);
  auto a = store->load_f32("a", {2, 3});
  REQUIRE(a.has_value());
  CHECK(*a == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(*store->load_f32_rows("a", {2, 3}, 1, 2) == std::vector<float>{4, 5, 6});
  CHECK(*store->load_f32_cols("a", {2, 3}, 1, 3) == std::vector<float>{2, 3, 5, 6});
  auto oob = store->load_f32_rows("a", {2, 3}, 1, 3);
  REQUIRE_FALSE(oob.has_value());
  CHECK(oob.error().message().find("outside shape [2, 3]") != std::string::npos);
}

TEST_CASE("safetensors: BF16 and F16 convert exactly to float32") {
  test::temp_dir tmp;
  // 1.5, -2, 65504 (max half), a subnormal half (2^-24)
  std::vector<uint16_t> f16 = {0x3e00, 0xc000, 0x7bff, 0x0001};
  std::vector<uint16_t> bf16 = {0x3fc0, 0xc000, 0x4780, 0x0000};
  test::raw_tensor h{"h", "F16", {4}, std::vector<uint8_t>(8)};
  test::raw_tensor b{"b", "BF16", {4}, std::vector<uint8_t>(8)};
  std::memcpy(h.bytes.data(), f16.data(), 8);
  std::memcpy(b.bytes.data(), bf16.data(), 8);
  auto path = tmp.path() / "w.safetensors";
  test::write_safetensors(path, {h, b});
  auto store = weight_store::open(path);
  REQUIRE(store.has_value());
  CHECK(*store->load_f32("h", {4}) == std::vector<float>{1.5f, -2.0f, 65504.0f, 0x1p-24f});
  CHECK(*store->load_f32("b", {4}) == std::vector<float>{1.5f, -2.0f, 65536.0f, 0.0f});
}

TEST_CASE("safetensors: truncated data is reported with the tensor and sizes") {
  test::temp_dir tmp;
  auto ts = two_tensors();
  auto data = data_of(ts);
  data.resize(data.size() - 3);
  auto path = tmp.path() / "cut.safetensors";
  test::write_raw_safetensors(path, test::safetensors_header(ts).dump(), data);
  auto msg = open_error(path);
  CHECK(msg.find("cut.safetensors") != std::string::npos);
  CHECK(msg.find("tensor 'b'") != std::string::npos);
  CHECK(msg.find("truncated") != std::string::npos);
}

TEST_CASE("safetensors: header length past the end of the file") {
  test::temp_dir tmp;
  auto ts = two_tensors();
  auto path = tmp.path() / "long.safetensors";
  test::write_raw_safetensors(path, test::safetensors_header(ts).dump(), data_of(ts), 1u << 20);
  auto msg = open_error(path);
  CHECK(msg.find("long.safetensors") != std::string::npos);
  CHECK(msg.find("header length 1048576 runs past the end of the file") != std::string::npos);

  auto tiny = tmp.path() / "tiny.safetensors";
  test::write_text(tiny, "abc");
  CHECK(open_error(tiny).find("too short") != std::string::npos);
}

TEST_CASE("safetensors: overlapping and out-of-range offsets") {
  test::temp_dir tmp;
  auto ts = two_tensors();
  auto header = test::safetensors_header(ts);
  header["b"]["data_offsets"] = {20, 28}; // overlaps a = [0, 24)
  auto path = tmp.path() / "overlap.safetensors";
  test::write_raw_safetensors(path, header.dump(), data_of(ts));
  auto msg = open_error(path);
  CHECK(msg.find("'a' [0, 24) and 'b' [20, 28) overlap") != std::string::npos);

  header = test::safetensors_header(ts);
  header["b"]["data_offsets"] = {32, 24};
  test::write_raw_safetensors(path, header.dump(), data_of(ts));
  CHECK(open_error(path).find("end before they begin") != std::string::npos);

  header = test::safetensors_header(ts);
  header["b"]["data_offsets"] = {4000, 4008};
  test::write_raw_safetensors(path, header.dump(), data_of(ts));
  msg = open_error(path);
  CHECK(msg.find("tensor 'b' ends at byte 4008") != std::string::npos);

  header = test::safetensors_header(ts);
  header["b"]["data_offsets"] = {24, 30}; // 6 bytes for two floats
  test::write_raw_safetensors(path, header.dump(), data_of(ts));
  CHECK(open_error(path).find("hold 6 bytes but shape [2] of F32 needs 8") != std::string::npos);
}

TEST_CASE("safetensors: unknown dtype and malformed header JSON") {
  test::temp_dir tmp;
  auto ts = two_tensors();
  auto header = test::safetensors_header(ts);
  header["a"]["dtype"] = "Q7";
  auto path = tmp.path() / "dtype.safetensors";
  test::write_raw_safetensors(path, header.dump(), data_of(ts));
  auto msg = open_error(path);
  CHECK(msg.find("tensor 'a': unknown dtype 'Q7'") != std::string::npos);

  test::write_raw_safetensors(path, "{\"a\": {\"dtype\": ", data_of(ts));
  CHECK(open_error(path).find("header is not valid JSON") != std::string::npos);

  // A known dtype that cannot be loaded as weights is refused when loading, naming it.
  test::raw_tensor i{"ids", "I64", {1}, std::vector<uint8_t>(8)};
  test::write_safetensors(path, {i});
  auto store = weight_store::open(path);
  REQUIRE(store.has_value());
  auto loaded = store->load_f32("ids", {1});
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().message().find("dtype I64") != std::string::npos);
}

TEST_CASE("model folder: a shape that disagrees with config.json, or a missing tensor") {
  test::temp_dir tmp;
  test::tiny_llama m;
  auto dir = tmp.path() / "model";
  m.write(dir, false);
  // Claim a larger hidden size than the weights have.
  auto cfg = m.config();
  cfg["intermediate_size"] = 40;
  test::write_text(dir / "config.json", cfg.dump());
  auto b = cpu_backend::load(dir, {});
  REQUIRE_FALSE(b.has_value());
  auto msg = b.error().to_string();
  CHECK(msg.find("model.layers.0.mlp.gate_proj.weight' has shape [24, 16] but config.json "
                 "implies [40, 16]") != std::string::npos);

  // Drop one tensor from the file.
  auto ts = m.tensors(7);
  ts.erase(std::find_if(ts.begin(), ts.end(), [](auto& t) {
    return t.name == "model.layers.1.self_attn.v_proj.weight";
  }));
  test::write_text(dir / "config.json", m.config().dump());
  test::write_safetensors(dir / "model.safetensors", ts);
  b = cpu_backend::load(dir, {});
  REQUIRE_FALSE(b.has_value());
  CHECK(b.error().message().find("missing tensor 'model.layers.1.self_attn.v_proj.weight'") !=
        std::string::npos);
}

TEST_CASE("sharded folder via model.safetensors.index.json gives the same model") {
  test::temp_dir tmp;
  test::tiny_llama m;
  m.write(tmp.path() / "single", false);
  m.write(tmp.path() / "sharded", true);
  auto whole = weight_store::open(tmp.path() / "single");
  auto shards = weight_store::open(tmp.path() / "sharded");
  REQUIRE(whole.has_value());
  REQUIRE_MESSAGE(shards.has_value(), (shards ? "" : shards.error().to_string()));
  CHECK(shards->num_tensors() == whole->num_tensors());
  for (auto name : {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"}) {
    auto [file, info] = *whole->lookup(name);
    CHECK(*shards->load_f32(name, info->shape) == *whole->load_f32(name, info->shape));
  }

  // An index entry pointing at the wrong shard, and a missing shard file.
  auto index = test::read_json(tmp.path() / "sharded" / "model.safetensors.index.json");
  index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors";
  test::write_text(tmp.path() / "sharded" / "model.safetensors.index.json", index.dump());
  auto wrong = weight_store::open(tmp.path() / "sharded");
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().message().find("lists tensor 'model.embed_tokens.weight' in "
                                     "model-00002-of-00002.safetensors, which does not hold it") !=
        std::string::npos);
  fs::remove(tmp.path() / "sharded" / "model-00001-of-00002.safetensors");
  auto missing = weight_store::open(tmp.path() / "sharded");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code() == errc::not_found);
  CHECK(missing.error().message().find("model-00001-of-00002.safetensors") != std::string::npos);

  auto nothing = weight_store::open(tmp.path() / "does-not-exist");
  REQUIRE_FALSE(nothing.has_value());
  CHECK(nothing.error().message().find("no such file or folder") != std::string::npos);
}

TEST_CASE("model folder: a KV cache larger than host memory is an error with the numbers") {
  test::temp_dir tmp;
  test::tiny_llama m;
  auto dir = tmp.path() / "model";
  m.write(dir, false);
  auto b = cpu_backend::load(dir, {.num_blocks = 1'000'000'000, .block_size = 16});
  REQUIRE_FALSE(b.has_value());
  CHECK(b.error().code() == errc::resource_exhausted);
  CHECK_MESSAGE(b.error().message().find("GiB of host memory") != std::string::npos,
                b.error().message());
  CHECK(cpu_backend::load(dir, {.num_blocks = 8, .block_size = 16}).has_value());
}
