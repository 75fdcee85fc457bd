#include "engine/model/gguf_dequant.hpp"

#include <array>
#include <cstring>

#include <fmt/format.h>

#include "engine/model/dtype.hpp"

namespace troupe::engine {

namespace {

constexpr int64_t qk_k = 256; // super-block size of the k-quants

struct type_entry {
  ggml_type type;
  ggml_type_traits traits;
};

// Block layouts from ggml-common.h.
constexpr std::array<type_entry, 15> type_table{{
    {ggml_type::f32, {"F32", 1, 4, true}},
    {ggml_type::f16, {"F16", 1, 2, true}},
    {ggml_type::q4_0, {"Q4_0", 32, 2 + 16, true}},
    {ggml_type::q4_1, {"Q4_1", 32, 2 + 2 + 16, true}},
    {ggml_type::q5_0, {"Q5_0", 32, 2 + 4 + 16, false}},
    {ggml_type::q5_1, {"Q5_1", 32, 2 + 2 + 4 + 16, false}},
    {ggml_type::q8_0, {"Q8_0", 32, 2 + 32, true}},
    {ggml_type::q8_1, {"Q8_1", 32, 2 + 2 + 32, false}},
    {ggml_type::q2_k, {"Q2_K", qk_k, qk_k / 16 + qk_k / 4 + 2 + 2, false}},
    {ggml_type::q3_k, {"Q3_K", qk_k, qk_k / 8 + qk_k / 4 + 12 + 2, false}},
    {ggml_type::q4_k, {"Q4_K", qk_k, 2 + 2 + 12 + qk_k / 2, true}},
    {ggml_type::q5_k, {"Q5_K", qk_k, 2 + 2 + 12 + qk_k / 8 + qk_k / 2, false}},
    {ggml_type::q6_k, {"Q6_K", qk_k, qk_k / 2 + qk_k / 4 + qk_k / 16 + 2, true}},
    {ggml_type::q8_k, {"Q8_K", qk_k, 4 + qk_k + qk_k / 16 * 2, false}},
    {ggml_type::bf16, {"BF16", 1, 2, true}},
}};

uint16_t load_u16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

float load_f16(const std::byte* p) {
  return f16_to_f32(load_u16(p));
}

const uint8_t* bytes(const std::byte* p) {
  return reinterpret_cast<const uint8_t*>(p);
}

// block_q4_0 { f16 d; u8 qs[16]; }: x = (nibble - 8) * d; low nibbles first, then high.
void dequant_q4_0(const std::byte* b, float* y) {
  const float d = load_f16(b);
  const uint8_t* qs = bytes(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1 { f16 d; f16 m; u8 qs[16]; }: x = nibble * d + m.
void dequant_q4_1(const std::byte* b, float* y) {
  const float d = load_f16(b), m = load_f16(b + 2);
  const uint8_t* qs = bytes(b + 4);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// block_q8_0 { f16 d; i8 qs[32]; }: x = q * d.
void dequant_q8_0(const std::byte* b, float* y) {
  const float d = load_f16(b);
  for (int j = 0; j < 32; ++j)
    y[j] = static_cast<float>(static_cast<int8_t>(bytes(b + 2)[j])) * d;
}

// The 6-bit scale and min of sub-block j from the 12 packed bytes of a Q4_K/Q5_K block.
void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<uint8_t>((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }: 8 sub-blocks of 32, each
// x = (d * sc) * nibble - (dmin * m).
void dequant_q4_k(const std::byte* b, float* y) {
  const float d = load_f16(b), dmin = load_f16(b + 2);
  const uint8_t* scales = bytes(b + 4);
  const uint8_t* q = bytes(b + 16);
  for (int j = 0, is = 0; j < qk_k; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l)
      *y++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
    for (int l = 0; l < 32; ++l)
      *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: 6-bit values (low 4 bits in ql,
// high 2 in qh) minus 32, times d * scale of their 16-element sub-block.
void dequant_q6_k(const std::byte* b, float* y) {
  const uint8_t* ql = bytes(b);
  const uint8_t* qh = bytes(b + 128);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = load_f16(b + 208);
  for (int n = 0; n < qk_k; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

template <class F>
void per_block(const std::byte* src, int64_t n, float* dst, int64_t block, size_t bytes_per,
               F&& f) {
  for (int64_t i = 0; i < n / block; ++i)
    f(src + static_cast<size_t>(i) * bytes_per, dst + i * block);
}

} // namespace

std::optional<ggml_type_traits> ggml_traits(uint32_t type) {
  for (const auto& e : type_table)
    if (static_cast<uint32_t>(e.type) == type)
      return e.traits;
  return std::nullopt;
}

std::string ggml_type_name(uint32_t type) {
  if (auto t = ggml_traits(type))
    return std::string(t->name);
  return fmt::format("type {}", type);
}

void dequantize_row(ggml_type type, const std::byte* src, int64_t n, float* dst) {
  switch (type) {
  case ggml_type::f32:
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  case ggml_type::f16:
    for (int64_t i = 0; i < n; ++i)
      dst[i] = load_f16(src + 2 * i);
    return;
  case ggml_type::bf16:
    for (int64_t i = 0; i < n; ++i)
      dst[i] = bf16_to_f32(load_u16(src + 2 * i));
    return;
  case ggml_type::q4_0:
    return per_block(src, n, dst, 32, 18, dequant_q4_0);
  case ggml_type::q4_1:
    return per_block(src, n, dst, 32, 20, dequant_q4_1);
  case ggml_type::q8_0:
    return per_block(src, n, dst, 32, 34, dequant_q8_0);
  case ggml_type::q4_k:
    return per_block(src, n, dst, qk_k, 144, dequant_q4_k);
  case ggml_type::q6_k:
    return per_block(src, n, dst, qk_k, 210, dequant_q6_k);
  default:
    break; // precondition violated: the caller checks ggml_traits()->dequantizable
  }
  std::memset(dst, 0, static_cast<size_t>(n) * sizeof(float));
}

} // namespace troupe::engine
