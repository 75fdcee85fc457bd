#include "engine/backend/cuda/kernels.cuh"

#include "engine/backend/cuda/device_math.cuh"

namespace troupe::engine::cuda {

namespace {

// Sum over a block of blockDim.x (a multiple of 32, at most 1024) threads; all threads get it.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = warp_sum(v);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
    part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < blockDim.x / 32 ? part[lane] : 0.0f;
    x = warp_sum(x);
    if (lane == 0)
      total = x;
  }
  __syncthreads();
  return total;
}

__global__ void embed_kernel(const int32_t* tokens, const bf16* table, int H, float* resid,
                             int vocab_begin, int vocab_rows) {
  pdl_wait();
  const int tok = tokens[blockIdx.x] - vocab_begin;
  const bool mine = tok >= 0 && tok < vocab_rows; // else another tensor rank's row: zeros
  const bf16* row = table + static_cast<size_t>(mine ? tok : 0) * H;
  float* dst = resid + static_cast<size_t>(blockIdx.x) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    dst[i] = mine ? __bfloat162float(row[i]) : 0.0f;
}

// One block per row: optional residual add, then RMSNorm into bf16.
template <bool add>
__global__ void norm_kernel(float* resid, const bf16* delta, const bf16* bias,
                            const int32_t* src_rows, int H, const float* w, float eps, bf16* out) {
  pdl_wait();
  const int row = src_rows != nullptr ? src_rows[blockIdx.x] : blockIdx.x;
  float* x = resid + static_cast<size_t>(row) * H;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = x[i];
    if constexpr (add) {
      v += __bfloat162float(delta[static_cast<size_t>(row) * H + i]) +
           (bias != nullptr ? __bfloat162float(bias[i]) : 0.0f);
      x[i] = v;
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss) / H + eps);
  bf16* o = out + static_cast<size_t>(blockIdx.x) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    o[i] = __float2bfloat16(w[i] * (x[i] * inv));
}

int norm_threads(int H) {
  int t = 32;
  while (t < H / 4 && t < 1024)
    t *= 2;
  return t;
}

// One warp per (token, head) of the fused qkv row.
__global__ void qkv_rope_cache_kernel(bf16* qkv, const bf16* bias, const float* q_norm,
                                      const float* k_norm, float eps, const int32_t* positions,
                                      const int32_t* slots, const float* inv_freq, int T,
                                      head_layout L, bf16* k_cache, bf16* v_cache) {
  pdl_wait();
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int heads = L.num_heads + 2 * L.num_kv_heads;
  if (warp >= T * heads)
    return;
  const int t = warp / heads, h = warp % heads;
  const int D = L.head_dim, half = D / 2;
  bf16* v = qkv + static_cast<size_t>(t) * L.qkv_width() + h * D;
  const bf16* b = bias != nullptr ? bias + h * D : nullptr;
  const bool is_q = h < L.num_heads;
  const bool is_k = !is_q && h < L.num_heads + L.num_kv_heads;
  const float* norm = is_q ? q_norm : is_k ? k_norm : nullptr;
  // Each lane owns the pairs (i, i + D/2) for i = lane, lane + 32, ... (D <= 256).
  float a[4], c[4];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    int i = lane + 32 * k;
    a[k] = c[k] = 0.0f;
    if (i < half) {
      a[k] = __bfloat162float(v[i]) + (b ? __bfloat162float(b[i]) : 0.0f);
      c[k] = __bfloat162float(v[i + half]) + (b ? __bfloat162float(b[i + half]) : 0.0f);
      ss += a[k] * a[k] + c[k] * c[k];
    }
  }
  float inv = 1.0f;
  if (norm != nullptr)
    inv = rsqrtf(warp_sum(ss) / D + eps);
  if (!is_q && slots[t] < 0)
    return; // a padding row of a decode step: no cache entry
  const int pos = positions[t];
  bf16* dst = v;
  if (is_k)
    dst = k_cache + (static_cast<size_t>(slots[t]) * L.num_kv_heads + (h - L.num_heads)) * D;
  else if (!is_q)
    dst = v_cache +
          (static_cast<size_t>(slots[t]) * L.num_kv_heads + (h - L.num_heads - L.num_kv_heads)) * D;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    int i = lane + 32 * k;
    if (i >= half)
      continue;
    float x = a[k], y = c[k];
    if (norm != nullptr) {
      x = norm[i] * (x * inv);
      y = norm[i + half] * (y * inv);
    }
    if (is_q || is_k) {
      float sn, cs;
      sincosf(static_cast<float>(pos) * inv_freq[i], &sn, &cs);
      float rx = x * cs - y * sn;
      float ry = y * cs + x * sn;
      x = rx;
      y = ry;
    }
    dst[i] = __float2bfloat16(x);
    dst[i + half] = __float2bfloat16(y);
  }
}

__global__ void silu_mul_kernel(const bf16* gu, int T, int I, bf16* out) {
  pdl_wait();
  size_t n = static_cast<size_t>(T) * I;
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    size_t t = idx / I, i = idx % I;
    float g = __bfloat162float(gu[t * 2 * I + i]);
    float u = __bfloat162float(gu[t * 2 * I + I + i]);
    out[idx] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
  }
}

__global__ void argmax_kernel(const float* logits, int V, int32_t* out) {
  pdl_wait();
  const float* row = logits + static_cast<size_t>(blockIdx.x) * V;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    float v = row[i];
    if (v > best || (v == best && i < idx)) {
      best = v;
      idx = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float ob = __shfl_xor_sync(0xffffffffu, best, o);
    int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ob > best || (ob == best && oi < idx)) {
      best = ob;
      idx = oi;
    }
  }
  __shared__ float sb[32];
  __shared__ int si[32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sb[warp] = best;
    si[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / 32; ++w)
      if (sb[w] > best || (sb[w] == best && si[w] < idx)) {
        best = sb[w];
        idx = si[w];
      }
    out[blockIdx.x] = idx;
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

__global__ void fill_random_kernel(bf16* dst, size_t n, float scale, uint64_t seed) {
  pdl_wait();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float u = static_cast<float>(mix64(seed * 0x9e3779b97f4a7c15ull + i) >> 40) / 16777216.0f;
    dst[i] = __float2bfloat16((2.0f * u - 1.0f) * scale);
  }
}

__global__ void fill_value_kernel(float* dst, size_t n, float value) {
  pdl_wait();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = value;
}

__global__ void f32_to_bf16_kernel(const float* src, size_t n, bf16* dst) {
  pdl_wait();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16(src[i]);
}

int grid_for(size_t n, int threads) {
  size_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks == 0 ? 1 : blocks) : 65536);
}

} // namespace

expected<void> embed(const int32_t* tokens, int T, const bf16* table, int H, float* resid,
                     cudaStream_t s, int vocab_begin, int vocab_rows) {
  if (T == 0)
    return {};
  TROUPE_CUDA(launch_pdl(embed_kernel, dim3(T), dim3(256), 0, s, tokens, table, H, resid,
                         vocab_begin, vocab_rows));
  return {};
}

expected<void> rms_norm(const float* x, int T, int H, const float* w, float eps, bf16* out,
                        cudaStream_t s) {
  if (T == 0)
    return {};
  TROUPE_CUDA(launch_pdl(norm_kernel<false>, dim3(T), dim3(norm_threads(H)), 0, s,
                         const_cast<float*>(x), nullptr, nullptr, nullptr, H, w, eps, out));
  return {};
}

expected<void> add_rms_norm(float* resid, const bf16* delta, const bf16* bias, int T, int H,
                            const float* w, float eps, bf16* out, cudaStream_t s) {
  if (T == 0)
    return {};
  TROUPE_CUDA(launch_pdl(norm_kernel<true>, dim3(T), dim3(norm_threads(H)), 0, s, resid, delta,
                         bias, nullptr, H, w, eps, out));
  return {};
}

expected<void> gather_rms_norm(const float* resid, const int32_t* src_rows, int R, int H,
                               const float* w, float eps, bf16* out, cudaStream_t s) {
  if (R == 0)
    return {};
  TROUPE_CUDA(launch_pdl(norm_kernel<false>, dim3(R), dim3(norm_threads(H)), 0, s,
                         const_cast<float*>(resid), nullptr, nullptr, src_rows, H, w, eps, out));
  return {};
}

expected<void> qkv_rope_cache(bf16* qkv, const bf16* bias, const float* q_norm, const float* k_norm,
                              float eps, const int32_t* positions, const int32_t* slots,
                              const float* inv_freq, int T, head_layout L, bf16* k_cache,
                              bf16* v_cache, cudaStream_t s) {
  if (L.head_dim > 256 || L.head_dim % 2 != 0)
    return error{errc::unsupported,
                 strf("CUDA backend: head_dim %d (supported: even, <= 256)", L.head_dim)};
  if (T == 0)
    return {};
  const int warps = T * (L.num_heads + 2 * L.num_kv_heads);
  TROUPE_CUDA(launch_pdl(qkv_rope_cache_kernel, dim3((warps + 7) / 8), dim3(256), 0, s, qkv, bias,
                         q_norm, k_norm, eps, positions, slots, inv_freq, T, L, k_cache, v_cache));
  return {};
}

expected<void> silu_mul(const bf16* gate_up, int T, int I, bf16* out, cudaStream_t s) {
  size_t n = static_cast<size_t>(T) * I;
  if (n == 0)
    return {};
  TROUPE_CUDA(
      launch_pdl(silu_mul_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, gate_up, T, I, out));
  return {};
}

expected<void> argmax_rows(const float* logits, int R, int V, int32_t* out, cudaStream_t s) {
  if (R == 0)
    return {};
  TROUPE_CUDA(launch_pdl(argmax_kernel, dim3(R), dim3(1024), 0, s, logits, V, out));
  return {};
}

expected<void> fill_random(bf16* dst, size_t n, float scale, uint64_t seed, cudaStream_t s) {
  TROUPE_CUDA(
      launch_pdl(fill_random_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, dst, n, scale, seed));
  return {};
}

expected<void> fill_value(float* dst, size_t n, float value, cudaStream_t s) {
  TROUPE_CUDA(
      launch_pdl(fill_value_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, dst, n, value));
  return {};
}

expected<void> f32_to_bf16(const float* src, size_t n, bf16* dst, cudaStream_t s) {
  TROUPE_CUDA(launch_pdl(f32_to_bf16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, src, n, dst));
  return {};
}

} // namespace troupe::engine::cuda
