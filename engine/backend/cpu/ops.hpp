// float32 reference kernels of the CPU backend. Plain loops written to be read and checked; they
// are also the oracle the CUDA kernels are compared against. Single-threaded, no allocation unless
// noted. Shapes in comments; all matrices row-major.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace troupe::engine::cpu {

// y[n, out] = x[n, in] · w[out, in]^T (+ bias[out] when non-null). Weights in PyTorch layout.
void matmul_nt(const float* x, int64_t n, int64_t in, const float* w, int64_t out, float* y,
               const float* bias = nullptr);

// out[n, dim] = x / sqrt(mean(x²) + eps) * weight; `out` may alias `x`.
void rms_norm(const float* x, int64_t n, int64_t dim, const float* weight, double eps, float* out);

// out[n, dim] = silu(gate) * up for x = [gate | up] laid out as two [n, dim] arrays.
void silu_mul(const float* gate, const float* up, int64_t n, int64_t dim, float* out);

// Rotary position embedding in the rotate-half (GPT-NeoX) layout Hugging Face uses:
// x[heads, head_dim] at `position`, pairs (i, i + head_dim/2) rotated by position * inv_freq[i].
void apply_rope(float* x, int64_t heads, int64_t head_dim, int32_t position,
                std::span<const float> inv_freq);

// Numerically stable softmax over x[n], in place.
void softmax(float* x, int64_t n);

} // namespace troupe::engine::cpu
