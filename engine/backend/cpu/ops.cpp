#include "engine/backend/cpu/ops.hpp"

#include <algorithm>
#include <cmath>

#include "engine/backend/cpu/thread_pool.hpp"

namespace troupe::engine::cpu {

namespace {

// Eight independent partial sums let the compiler vectorise without reassociating.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k)
      acc[k] += a[i + k] * b[i + k];
  float tail = 0;
  for (; i < n; ++i)
    tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

} // namespace

void matmul_nt(const float* x, int64_t n, int64_t in, const float* w, int64_t out, float* y,
               const float* bias) {
  // Outer loop over weight rows so each row is read once from memory per block of tokens.
  // Output features are split across the shared thread pool; every y element is still one dot()
  // by one thread, so the result does not depend on the thread count.
  constexpr int64_t token_block = 8;
  auto rows = [&](int64_t o0, int64_t o1) {
    for (int64_t t0 = 0; t0 < n; t0 += token_block) {
      int64_t t1 = std::min(n, t0 + token_block);
      for (int64_t o = o0; o < o1; ++o) {
        const float* wrow = w + o * in;
        float b = bias != nullptr ? bias[o] : 0.0f;
        for (int64_t t = t0; t < t1; ++t)
          y[t * out + o] = dot(x + t * in, wrow, in) + b;
      }
    }
  };
  // Waking workers costs tens of microseconds, more on a loaded machine: only large products
  // (prefill, lm_head) are split, in chunks of at least ~1M multiply-adds.
  const int64_t work = n * in * out;
  if (work < (int64_t{1} << 22)) {
    rows(0, out);
    return;
  }
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, n * in));
  thread_pool::shared().parallel_for(out, grain, rows);
}

void rms_norm(const float* x, int64_t n, int64_t dim, const float* weight, double eps, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x + t * dim;
    double sum = 0;
    for (int64_t i = 0; i < dim; ++i)
      sum += static_cast<double>(row[i]) * row[i];
    float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(dim) + eps));
    float* dst = out + t * dim;
    for (int64_t i = 0; i < dim; ++i)
      dst[i] = weight[i] * (row[i] * inv);
  }
}

void silu_mul(const float* gate, const float* up, int64_t n, int64_t dim, float* out) {
  for (int64_t i = 0; i < n * dim; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void apply_rope(float* x, int64_t heads, int64_t head_dim, int32_t position,
                std::span<const float> inv_freq) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    // float32 product, as the reference computes it
    float angle = static_cast<float>(position) * inv_freq[static_cast<size_t>(i)];
    float c = std::cos(angle);
    float s = std::sin(angle);
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + h * head_dim;
      float a = v[i];
      float b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

void softmax(float* x, int64_t n) {
  float max = x[0];
  for (int64_t i = 1; i < n; ++i)
    max = std::max(max, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i)
    x[i] *= inv;
}

} // namespace troupe::engine::cpu
