// The cold-start weight uploader (engine/backend/cuda/cuda_loader.cuh) against a CPU reference:
// row and column slices of BF16, F16 and F32 tensors read from a safetensors file land on the GPU
// as bf16 rounded to nearest even, over many shapes and staging sizes, into poisoned buffers.
// Label `gpu`; skips with the reason where no GPU is.
#include <bit>
#include <cstring>
#include <filesystem>
#include <random>

#include <doctest/doctest.h>

#include "engine/backend/cuda/cuda_loader.cuh"
#include "engine/model/dtype.hpp"
#include "engine/model/safetensors.hpp"
#include "gpu_test_util.hpp"
#include "safetensors_writer.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace troupe::engine::cuda;

namespace {

uint16_t bf16_bits(float f) {
  return static_cast<uint16_t>(std::bit_cast<uint32_t>(round_to_bf16(f)) >> 16);
}

// Random values that are not bf16-exact (so rounding is exercised), with a few specials.
std::vector<float> values(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (auto& x : v)
    x = d(rng);
  if (n > 3) {
    v[0] = 0.0f;
    v[1] = -0.0f;
    v[2] = 65504.0f; // largest f16
  }
  return v;
}

test::raw_tensor tensor_of(const std::string& name, const std::string& type,
                           std::vector<int64_t> shape, const std::vector<float>& v) {
  test::raw_tensor t{name, type, std::move(shape), {}};
  for (float f : v) {
    if (type == "F32") {
      uint32_t b = std::bit_cast<uint32_t>(f);
      t.bytes.insert(t.bytes.end(), reinterpret_cast<uint8_t*>(&b),
                     reinterpret_cast<uint8_t*>(&b) + 4);
    } else {
      uint16_t b =
          type == "BF16" ? bf16_bits(f) : std::bit_cast<uint16_t>(static_cast<_Float16>(f));
      t.bytes.insert(t.bytes.end(), reinterpret_cast<uint8_t*>(&b),
                     reinterpret_cast<uint8_t*>(&b) + 2);
    }
  }
  return t;
}

// What the GPU must hold: the stored value (f16 / bf16 as stored) rounded to bf16.
uint16_t expected_bits(const std::string& type, float f) {
  if (type == "F16")
    return bf16_bits(static_cast<float>(static_cast<_Float16>(f)));
  return bf16_bits(f); // F32 rounds once; BF16 was stored rounded
}

struct shape2 {
  int64_t rows, cols;
};

} // namespace

TEST_CASE("cuda weight loader: row and column slices of BF16, F16 and F32 land as bf16") {
  if (!test::have_gpu())
    return;
  std::mt19937 rng(3);
  const auto dir = std::filesystem::temp_directory_path() / "troupe_loader_test";
  std::filesystem::create_directories(dir);
  const std::vector<shape2> shapes = {{1, 1},     {3, 5},      {17, 130},
                                      {64, 4096}, {257, 1031}, {2, 12288}};
  const std::vector<std::string> types = {"BF16", "F16", "F32"};
  std::vector<test::raw_tensor> tensors;
  std::vector<std::vector<float>> data;
  for (size_t s = 0; s < shapes.size(); ++s)
    for (const auto& t : types) {
      data.push_back(values(static_cast<size_t>(shapes[s].rows * shapes[s].cols), rng));
      std::string name = std::to_string(s);
      name += t; // e.g. "3F16"
      tensors.push_back(tensor_of(name, t, {shapes[s].rows, shapes[s].cols}, data.back()));
    }
  test::write_safetensors(dir / "model.safetensors", tensors);
  auto store = weight_store::open(dir / "model.safetensors");
  REQUIRE(store.has_value());
  // Staging slots from one row's worth (many pieces per job) to larger than any tensor.
  for (size_t slot : {size_t{49152}, size_t{1} << 16, size_t{1} << 22}) {
    CAPTURE(slot);
    auto up = weight_uploader::create(0, 3, 2, slot);
    REQUIRE(up.has_value());
    struct check {
      size_t tensor;
      int64_t r0, r1, c0, c1;
      bf16* dst;
    };
    std::vector<check> checks;
    std::vector<void*> buffers;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const int64_t R = t.shape[0], C = t.shape[1];
      auto found = store->lookup(t.name);
      REQUIRE(found.has_value());
      const auto [file, info] = *found;
      const size_t es = dtype_size(info->type);
      std::uniform_int_distribution<int64_t> rr(0, R), cc(0, C);
      int64_t a = rr(rng), b = rr(rng), x = cc(rng), y = cc(rng);
      // Whole tensor, a row range (tensor-parallel q/k/v/gate/up shard), a column range (o/down).
      for (auto [r0, r1, c0, c1] : {std::tuple{int64_t{0}, R, int64_t{0}, C},
                                    {std::min(a, b), std::max(a, b), int64_t{0}, C},
                                    {int64_t{0}, R, std::min(x, y), std::max(x, y)}}) {
        const size_t n = static_cast<size_t>((r1 - r0) * (c1 - c0));
        void* d = nullptr;
        REQUIRE(cudaMalloc(&d, std::max<size_t>(n, 1) * 2) == cudaSuccess);
        REQUIRE(cudaMemset(d, 0xff, std::max<size_t>(n, 1) * 2) == cudaSuccess); // poison (NaN)
        buffers.push_back(d);
        upload_job j{.src = file->data(*info) + static_cast<size_t>(r0 * C) * es,
                     .type = info->type,
                     .rows = r1 - r0,
                     .ld = C,
                     .col_begin = c0,
                     .width = c1 - c0,
                     .dst = static_cast<bf16*>(d)};
        REQUIRE((*up)->enqueue(j).has_value());
        checks.push_back({i, r0, r1, c0, c1, static_cast<bf16*>(d)});
      }
    }
    auto st = (*up)->finish();
    REQUIRE(st.has_value());
    CHECK(st->workers == 3);
    for (const auto& c : checks) {
      const auto& t = tensors[c.tensor];
      const int64_t C = t.shape[1], w = c.c1 - c.c0;
      CAPTURE(t.name);
      CAPTURE(c.r0);
      CAPTURE(c.r1);
      CAPTURE(c.c0);
      CAPTURE(c.c1);
      std::vector<uint16_t> got(static_cast<size_t>((c.r1 - c.r0) * w));
      REQUIRE(cudaMemcpy(got.data(), c.dst, got.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
      size_t wrong = 0;
      for (int64_t r = c.r0; r < c.r1; ++r)
        for (int64_t k = c.c0; k < c.c1; ++k)
          wrong += got[static_cast<size_t>((r - c.r0) * w + k - c.c0)] !=
                   expected_bits(t.dtype, data[c.tensor][static_cast<size_t>(r * C + k)]);
      CHECK(wrong == 0);
    }
    for (void* d : buffers)
      cudaFree(d);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("cuda weight loader: decoded floats it owns, and the errors it names") {
  if (!test::have_gpu())
    return;
  std::mt19937 rng(5);
  auto up = weight_uploader::create(0, 2, 2, 4096);
  REQUIRE(up.has_value());
  // Floats kept alive by the job alone (the GGUF path): freed by the uploader once staged.
  auto owned = std::make_shared<std::vector<float>>(values(3000, rng));
  const std::vector<float> want = *owned;
  void* d = nullptr;
  REQUIRE(cudaMalloc(&d, want.size() * 2) == cudaSuccess);
  REQUIRE(cudaMemset(d, 0xff, want.size() * 2) == cudaSuccess);
  REQUIRE((*up)
              ->enqueue({.src = reinterpret_cast<const std::byte*>(owned->data()),
                         .type = dtype::f32,
                         .rows = 100,
                         .ld = 30,
                         .col_begin = 0,
                         .width = 30,
                         .dst = static_cast<bf16*>(d),
                         .owner = owned})
              .has_value());
  owned.reset();
  // A row wider than a staging slot, a slice outside its matrix, a type that does not travel.
  std::vector<float> wide(2048);
  auto src = reinterpret_cast<const std::byte*>(wide.data());
  CHECK_FALSE((*up)
                  ->enqueue({.src = src,
                             .type = dtype::f32,
                             .rows = 1,
                             .ld = 2048,
                             .width = 2048,
                             .dst = static_cast<bf16*>(d)})
                  .has_value());
  CHECK_FALSE((*up)
                  ->enqueue({.src = src,
                             .type = dtype::f32,
                             .rows = 1,
                             .ld = 8,
                             .col_begin = 4,
                             .width = 5,
                             .dst = static_cast<bf16*>(d)})
                  .has_value());
  CHECK_FALSE((*up)
                  ->enqueue({.src = src,
                             .type = dtype::f64,
                             .rows = 1,
                             .ld = 8,
                             .width = 8,
                             .dst = static_cast<bf16*>(d)})
                  .has_value());
  REQUIRE((*up)->finish().has_value());
  std::vector<uint16_t> got(want.size());
  REQUIRE(cudaMemcpy(got.data(), d, got.size() * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  size_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i)
    wrong += got[i] != bf16_bits(want[i]);
  CHECK(wrong == 0);
  cudaFree(d);
}
