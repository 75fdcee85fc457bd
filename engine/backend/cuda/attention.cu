// Paged causal attention, the entry point for every step (paged_attention): tensor-core tiles
// (flash_prefill.cu) for prefill chunks and, split-K, for decode tokens, combined here; and the
// CUDA-core split-K kernel below for head layouts the tensor-core kernel does not cover (and the
// tests' reference paths). One block of it handles one query token, one kv head (all the query
// heads of its GQA group share the loaded keys and values) and one share of the context, with an
// online softmax.
#include <algorithm>

#include "engine/backend/cuda/device_math.cuh"
#include "engine/backend/cuda/kernels.cuh"

namespace troupe::engine::cuda {

namespace {

constexpr int attn_threads = 128;
constexpr int attn_chunk = attn_threads; // keys per pass: one per thread when scoring

// partial[((t * nh + h) * splits + split) * (D + 2)]: D unnormalised outputs, then max and sum.
// Block (token t, kv head, split) with G query heads per kv head. The token's context is divided
// evenly among the splits on the device, so graphs captured once serve every context length.
// Scoring: one key per thread, 16-byte key loads; values: threads split as (key lane, 8 dims),
// 16-byte value loads, partial sums reduced through shared memory at the end.
template <int G>
__global__ void __launch_bounds__(attn_threads)
    attention_split_kernel(attention_args a, head_layout L) {
  pdl_wait();
  extern __shared__ float smem[];
  __shared__ int slot_s[attn_chunk];
  __shared__ float wred[G][attn_threads / 32];
  __shared__ float m_s[G], l_s[G], f_s[G];
  const int D = L.head_dim, dim_lanes = D / 8, key_lanes = attn_threads / dim_lanes;
  float* q_s = smem;                 // [G, D]
  float* p_s = q_s + G * D;          // [G, attn_chunk]
  float* red = p_s + G * attn_chunk; // [key_lanes, G, D]
  const int t = a.split_tokens != nullptr ? a.split_tokens[blockIdx.x] : blockIdx.x;
  const int kvh = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int seq = a.token_seq[t];
  const int ctx = a.positions[t] + 1;
  const int per = (ctx + gridDim.z - 1) / gridDim.z;
  const int begin = split * per, end = min(ctx, begin + per);
  auto partial = [&](int g) {
    return a.partial +
           ((static_cast<size_t>(t) * L.num_heads + kvh * G + g) * gridDim.z + split) * (D + 2);
  };
  if (end <= begin) {
    if (tid < G) {
      partial(tid)[D] = -INFINITY;
      partial(tid)[D + 1] = 0.0f;
    }
    return;
  }
  const bf16* q = a.qkv + static_cast<size_t>(t) * L.qkv_width() + kvh * G * D;
  for (int i = tid; i < G * D; i += attn_threads)
    q_s[i] = __bfloat162float(q[i]) * a.scale;
  if (tid < G) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  const int* table = a.block_tables + static_cast<size_t>(seq) * a.max_blocks;
  const int kl = tid / dim_lanes, dl = tid % dim_lanes;
  const bool pv_active = kl < key_lanes;
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      acc[g][e] = 0.0f;
  __syncthreads();

  for (int c0 = begin; c0 < end; c0 += attn_chunk) {
    const int n = min(attn_chunk, end - c0);
    float sc[G];
#pragma unroll
    for (int g = 0; g < G; ++g)
      sc[g] = -INFINITY;
    if (tid < n) {
      const int pos = c0 + tid;
      const int slot = table[pos / a.block_size] * a.block_size + pos % a.block_size;
      slot_s[tid] = slot;
      const uint4* k = reinterpret_cast<const uint4*>(
          a.k_cache + (static_cast<size_t>(slot) * L.num_kv_heads + kvh) * D);
#pragma unroll
      for (int g = 0; g < G; ++g)
        sc[g] = 0.0f;
      for (int piece = 0; piece < dim_lanes; ++piece) {
        float kf[8];
        bf16x8_to_float(k[piece], kf);
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
          for (int e = 0; e < 8; ++e)
            sc[g] += q_s[g * D + piece * 8 + e] * kf[e];
      }
    }
    // Block-wide max per head, then the new running max.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float v = warp_max(sc[g]);
      if (lane == 0)
        wred[g][warp] = v;
    }
    __syncthreads();
    float m_new[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float cm = wred[g][0];
      for (int w = 1; w < attn_threads / 32; ++w)
        cm = fmaxf(cm, wred[g][w]);
      m_new[g] = fmaxf(m_s[g], cm);
      const float e = tid < n ? __expf(sc[g] - m_new[g]) : 0.0f;
      p_s[g * attn_chunk + tid] = e;
      sc[g] = e;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float v = warp_sum(sc[g]);
      if (lane == 0)
        wred[g][warp] = v;
    }
    __syncthreads();
    if (tid < G) {
      float sum = 0.0f;
      for (int w = 0; w < attn_threads / 32; ++w)
        sum += wred[tid][w];
      const float f = __expf(m_s[tid] - m_new[tid]);
      f_s[tid] = f;
      l_s[tid] = l_s[tid] * f + sum;
      m_s[tid] = m_new[tid];
    }
    __syncthreads();
    if (pv_active) {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e)
          acc[g][e] *= f_s[g];
#pragma unroll 4
      for (int j = kl; j < n; j += key_lanes) {
        const uint4 v = *reinterpret_cast<const uint4*>(
            a.v_cache + (static_cast<size_t>(slot_s[j]) * L.num_kv_heads + kvh) * D + dl * 8);
        float vf[8];
        bf16x8_to_float(v, vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float p = p_s[g * attn_chunk + j];
#pragma unroll
          for (int e = 0; e < 8; ++e)
            acc[g][e] += p * vf[e];
        }
      }
    }
    __syncthreads();
  }
  if (pv_active)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e)
        red[(kl * G + g) * D + dl * 8 + e] = acc[g][e];
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += attn_threads) {
    const int g = idx / D, d = idx % D;
    float sum = 0.0f;
    for (int k = 0; k < key_lanes; ++k)
      sum += red[(k * G + g) * D + d];
    partial(g)[d] = sum;
  }
  if (tid < G) {
    partial(tid)[D] = m_s[tid];
    partial(tid)[D + 1] = l_s[tid];
  }
}

template <int G>
expected<void> launch_split(const attention_args& a, head_layout L, cudaStream_t s) {
  const int key_lanes = attn_threads / (L.head_dim / 8);
  const size_t smem = sizeof(float) * (static_cast<size_t>(G) * L.head_dim + G * attn_chunk +
                                       static_cast<size_t>(key_lanes) * G * L.head_dim);
  if (smem > 48 * 1024)
    TROUPE_CUDA(cudaFuncSetAttribute(attention_split_kernel<G>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const int tokens = a.split_tokens != nullptr ? a.num_split_tokens : a.T;
  TROUPE_CUDA(launch_pdl(attention_split_kernel<G>, dim3(tokens, L.num_kv_heads, a.num_splits),
                         dim3(attn_threads), smem, s, a, L));
  return {};
}

constexpr int max_splits = 512;

// One block per (token, query head): a warp finds the global max and normaliser over the
// splits, then every thread sums the rescaled partial outputs of its dimensions.
__global__ void attention_combine_kernel(attention_args a, head_layout L) {
  pdl_wait();
  __shared__ float weight[max_splits];
  const int t = a.split_tokens != nullptr ? a.split_tokens[blockIdx.x] : blockIdx.x;
  const int h = blockIdx.y, D = L.head_dim;
  const float* base =
      a.partial + (static_cast<size_t>(t) * L.num_heads + h) * a.num_splits * (D + 2);
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int s = threadIdx.x; s < a.num_splits; s += 32)
      m = fmaxf(m, base[s * (D + 2) + D]);
    m = warp_max(m);
    float l = 0.0f;
    for (int s = threadIdx.x; s < a.num_splits; s += 32) {
      const float* p = base + s * (D + 2);
      const float w = p[D + 1] > 0.0f ? __expf(p[D] - m) : 0.0f;
      weight[s] = w;
      l += w * p[D + 1];
    }
    l = warp_sum(l);
    for (int s = threadIdx.x; s < a.num_splits; s += 32)
      weight[s] /= l;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 4
    for (int s = 0; s < a.num_splits; ++s)
      acc += weight[s] * base[s * (D + 2) + d];
    a.out[(static_cast<size_t>(t) * L.num_heads + h) * D + d] = __float2bfloat16(acc);
  }
}

} // namespace

void route_attention(const int* seq_tokens, int num_seqs, head_layout L, int min_tokens,
                     int32_t* tiles, int32_t* split_tokens, int32_t* decode_tiles,
                     attention_args& a) {
  const bool flash = flash_prefill_supported(L);
  const int per_tile = flash ? flash_tile_tokens(L) : 0;
  a.num_flash_tiles = a.num_split_tokens = 0;
  for (int i = 0, t = 0; i < num_seqs; t += seq_tokens[i], ++i) {
    const int n = seq_tokens[i];
    if (flash && n >= min_tokens) {
      for (int j = 0; j < n; j += per_tile) {
        int32_t* tile = tiles + 3 * a.num_flash_tiles++;
        tile[0] = i;
        tile[1] = t + j;
        tile[2] = std::min(per_tile, n - j);
      }
    } else {
      for (int j = 0; j < n; ++j) {
        int32_t* tile = decode_tiles + 3 * a.num_split_tokens;
        tile[0] = i;
        tile[1] = t + j;
        tile[2] = 1;
        split_tokens[a.num_split_tokens++] = t + j;
      }
    }
  }
}

size_t attention_partial_floats(int T, head_layout L, int num_splits) {
  return static_cast<size_t>(T) * L.num_heads * num_splits * (L.head_dim + 2);
}

expected<void> paged_attention(const attention_args& a, head_layout L, cudaStream_t s) {
  if (a.T == 0)
    return {};
  const int group = L.num_heads / L.num_kv_heads;
  if (a.num_splits > max_splits)
    return error{errc::invalid_argument,
                 strf("CUDA attention: %d splits > %d", a.num_splits, max_splits)};
  if (L.head_dim > 256 || L.head_dim % 8 != 0 || group > 8)
    return error{errc::unsupported,
                 strf("CUDA attention: head_dim %d with %d query heads per kv head (supported: "
                      "head_dim a multiple of 8 up to 256, at most 8 query heads per kv head)",
                      L.head_dim, group)};
  using launcher = expected<void> (*)(const attention_args&, head_layout, cudaStream_t);
  static constexpr launcher by_group[] = {launch_split<1>, launch_split<2>, launch_split<3>,
                                          launch_split<4>, launch_split<5>, launch_split<6>,
                                          launch_split<7>, launch_split<8>};
  TROUPE_TRY_VOID(flash_attention(a, L, false, s));
  const int tokens = a.split_tokens != nullptr ? a.num_split_tokens : a.T;
  if (tokens == 0)
    return {};
  if (a.decode_tiles != nullptr && a.split_tokens != nullptr && flash_prefill_supported(L)) {
    TROUPE_TRY_VOID(flash_attention(a, L, true, s));
    if (a.num_splits == 1) // the flash kernel wrote the final output
      return {};
  } else {
    TROUPE_TRY_VOID(by_group[group - 1](a, L, s));
  }
  TROUPE_CUDA(
      launch_pdl(attention_combine_kernel, dim3(tokens, L.num_heads), dim3(128), 0, s, a, L));
  return {};
}

} // namespace troupe::engine::cuda
