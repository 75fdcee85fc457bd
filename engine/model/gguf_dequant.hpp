// ggml tensor types as stored in GGUF files, their block layouts, and dequantisation to float32.
// Used by the GGUF reader (gguf.cpp) and the gguf weight source; pure functions, no allocation,
// safe on any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace troupe::engine {

// ggml_type ids (ggml.h); only the ones we name are listed, the file may hold others.
enum class ggml_type : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  bf16 = 30,
};

struct ggml_type_traits {
  std::string_view name; // "Q4_K", as llama.cpp spells it
  int64_t block_size;    // elements per block
  size_t block_bytes;    // bytes per block
  bool dequantizable;    // whether dequantize_row handles it
};

// Traits of a type id found in a file; nullopt for ids this build does not know at all.
std::optional<ggml_type_traits> ggml_traits(uint32_t type);
// "Q4_K" or "type 42" for unknown ids (for error messages).
std::string ggml_type_name(uint32_t type);

// Dequantises `n` elements (a multiple of the type's block size) starting at `src` (any
// alignment) into `dst`. Precondition: ggml_traits(type)->dequantizable.
void dequantize_row(ggml_type type, const std::byte* src, int64_t n, float* dst);

} // namespace troupe::engine
