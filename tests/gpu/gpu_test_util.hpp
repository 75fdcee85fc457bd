// Helpers shared by the GPU tests: skip-with-reason, bf16 conversions, relative L2 error.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include <doctest/doctest.h>

#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/model/dtype.hpp"

namespace troupe::test {

// True when a CUDA device is usable; otherwise prints why the test skips.
inline bool have_gpu() {
  auto why = engine::cuda_unavailable_reason();
  if (!why.empty())
    MESSAGE("SKIP: " << why);
  return why.empty();
}

inline std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    b[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(engine::round_to_bf16(v[i])) >> 16);
  return b;
}

inline std::vector<float> from_bf16_bits(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i)
    v[i] = engine::bf16_to_f32(b[i]);
  return v;
}

// ||got - want|| / ||want||; infinite when got holds a NaN or infinity.
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i]))
      return INFINITY;
    num += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
    den += want[i] * static_cast<double>(want[i]);
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

} // namespace troupe::test
