// Element types found in checkpoints and their conversion to float32. Used by the safetensors
// reader and every backend's weight loader. Pure functions, no allocation.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace troupe::engine {

enum class dtype : uint8_t {
  f32,
  f16,
  bf16,
  f64,
  i64,
  i32,
  i16,
  i8,
  u8,
  boolean,
  f8_e4m3,
  f8_e5m2
};

// Size in bytes of one element.
size_t dtype_size(dtype t);
// safetensors spelling: "F32", "BF16", ...
std::string_view dtype_name(dtype t);
std::optional<dtype> parse_dtype(std::string_view name);
// Whether convert_to_f32 handles this type.
bool is_float_loadable(dtype t);

inline float bf16_to_f32(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0)
      return std::bit_cast<float>(sign);
    // subnormal half: normalise into a float32 normal
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return std::bit_cast<float>(sign | static_cast<uint32_t>(127 - 15 - e) << 23 | mant << 13);
  }
  if (exp == 0x1f)
    return std::bit_cast<float>(sign | 0x7f800000u | mant << 13);
  return std::bit_cast<float>(sign | (exp + 127 - 15) << 23 | mant << 13);
}

// Rounds to the nearest bfloat16 / float16 value (ties to even) and back to float32.
inline float round_to_bf16(float f) {
  uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7f800000u) == 0x7f800000u) // inf or nan: keep
    return f;
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return std::bit_cast<float>(bits);
}
inline float round_to_f16(float f) {
  return static_cast<float>(static_cast<_Float16>(f));
}

// Converts `count` elements of type `t` at `src` (any alignment) to float32 at `dst`.
// Precondition: is_float_loadable(t).
void convert_to_f32(dtype t, const std::byte* src, size_t count, float* dst);

} // namespace troupe::engine
