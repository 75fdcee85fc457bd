#include "engine/model/dtype.hpp"

#include <array>
#include <cstring>
#include <utility>

namespace troupe::engine {

namespace {

constexpr std::array<std::pair<std::string_view, dtype>, 12> names{{
    {"F32", dtype::f32},
    {"F16", dtype::f16},
    {"BF16", dtype::bf16},
    {"F64", dtype::f64},
    {"I64", dtype::i64},
    {"I32", dtype::i32},
    {"I16", dtype::i16},
    {"I8", dtype::i8},
    {"U8", dtype::u8},
    {"BOOL", dtype::boolean},
    {"F8_E4M3", dtype::f8_e4m3},
    {"F8_E5M2", dtype::f8_e5m2},
}};

} // namespace

size_t dtype_size(dtype t) {
  switch (t) {
  case dtype::f64:
  case dtype::i64:
    return 8;
  case dtype::f32:
  case dtype::i32:
    return 4;
  case dtype::f16:
  case dtype::bf16:
  case dtype::i16:
    return 2;
  case dtype::i8:
  case dtype::u8:
  case dtype::boolean:
  case dtype::f8_e4m3:
  case dtype::f8_e5m2:
    return 1;
  }
  return 0;
}

std::string_view dtype_name(dtype t) {
  for (auto& [name, value] : names)
    if (value == t)
      return name;
  return "?";
}

std::optional<dtype> parse_dtype(std::string_view name) {
  for (auto& [text, value] : names)
    if (text == name)
      return value;
  return std::nullopt;
}

bool is_float_loadable(dtype t) {
  return t == dtype::f32 || t == dtype::f16 || t == dtype::bf16;
}

void convert_to_f32(dtype t, const std::byte* src, size_t count, float* dst) {
  switch (t) {
  case dtype::f32:
    std::memcpy(dst, src, count * sizeof(float));
    return;
  case dtype::bf16:
    for (size_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = bf16_to_f32(bits);
    }
    return;
  case dtype::f16:
    for (size_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = f16_to_f32(bits);
    }
    return;
  default:
    return;
  }
}

} // namespace troupe::engine
