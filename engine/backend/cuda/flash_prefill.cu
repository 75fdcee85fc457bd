// Causal attention on tensor cores (flash-attention 2 style) over the paged KV cache: prefill tiles
// whole, decode tokens split-K over the context (flash-decoding) with attention.cu's combine.
// One block per (tile of consecutive query tokens of one sequence, kv head): its 64 rows are the
// tile's tokens x the G query heads sharing that kv head, so each key/value tile loaded into
// shared memory serves all of them. Four warps own 16 rows each; S = Q K^T and O += P V run on
// mma.sync m16n8k16 (bf16 in, fp32 accumulate, operands through ldmatrix) with the online softmax
// kept in registers; the next key/value tile is fetched with cp.async while this one is used.
// Called by paged_attention (attention.cu).
#include "engine/backend/cuda/device_math.cuh"
#include "engine/backend/cuda/kernels.cuh"

namespace troupe::engine::cuda {

namespace {

constexpr int flash_rows = 64; // query rows (token, head) per block
constexpr int flash_keys = 64; // keys per shared-memory tile
constexpr int flash_threads = 128;

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two bf16, the first in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory; lane i gives the address of row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid.
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One key/value tile for one warp: S = Q K^T, causal mask, online softmax update, O += P V.
template <int D>
__device__ __forceinline__ void tile_step(const bf16* k_s, const bf16* v_s, int k0, int k_end,
                                          const uint32_t (&qf)[D / 16][4], const int (&row_pos)[2],
                                          float scale_log2, float (&m)[2], float (&l)[2],
                                          float (&o)[D / 8][4], int lane) {
  constexpr int stride = D + 8;
  const int quad = lane % 4;

  // S = Q K^T for 64 keys: 8 column tiles of 8 keys, two per ldmatrix.
  float s[flash_keys / 8][4];
#pragma unroll
  for (int j = 0; j < flash_keys / 8; ++j)
    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int j = 0; j < flash_keys / 8; j += 2) {
    // matrices: (tile j, dims +0), (j, +8), (j + 1, +0), (j + 1, +8) of each 16-dim slice
    const bf16* krow = k_s + (j * 8 + (lane / 16) * 8 + lane % 8) * stride + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, krow + kk * 16);
      mma_bf16(s[j], qf[kk], b[0], b[1]);
      mma_bf16(s[j + 1], qf[kk], b[2], b[3]);
    }
  }
  // Causal mask, scale into log2 units, running max per row.
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < flash_keys / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e / 2, key = k0 + j * 8 + quad * 2 + e % 2;
      const float v = key <= row_pos[h] && key < k_end ? s[j][e] * scale_log2 : -INFINITY;
      s[j][e] = v;
      mx[h] = fmaxf(mx[h], v);
    }
  float factor[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    const float m_new = fmaxf(m[h], mx[h]);
    // Rows with nothing visible yet keep m = -inf; use 0 as the base so no NaN appears.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    factor[h] = exp2f(m[h] - base);
    m[h] = m_new;
    mx[h] = base;
  }
  float rs[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < flash_keys / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(s[j][e] - mx[e / 2]);
      s[j][e] = p;
      rs[e / 2] += p;
    }
#pragma unroll
  for (int h = 0; h < 2; ++h)
    l[h] = l[h] * factor[h] + rs[h];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[n][0] *= factor[0];
    o[n][1] *= factor[0];
    o[n][2] *= factor[1];
    o[n][3] *= factor[1];
  }
  // O += P V: P's accumulator layout is the A fragment layout of the next product.
#pragma unroll
  for (int kk = 0; kk < flash_keys / 16; ++kk) {
    const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                            pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                            pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                            pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
    // matrices (transposed): (keys +0, dims n), (keys +8, n), (keys +0, n + 1), (keys +8, n + 1)
    const bf16* vrow = v_s + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * stride + (lane / 16) * 8;
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, vrow + n * 8);
      mma_bf16(o[n], pa, b[0], b[1]);
      mma_bf16(o[n + 1], pa, b[2], b[3]);
    }
  }
}

// Tile i of a.flash_tiles (a.decode_tiles when `decode`): [sequence index, first token, token
// count]. With gridDim.z > 1 the keys are split in gridDim.z shares (split-K, decode tiles) and
// the block writes unnormalised partial results for attention_combine_kernel.
template <int D>
__global__ void __launch_bounds__(flash_threads)
    flash_prefill_kernel(attention_args a, head_layout L, bool decode) {
  pdl_wait();
  constexpr int stride = D + 8;                  // padded shared rows: conflict-free ldmatrix
  constexpr int stage = 2 * flash_keys * stride; // keys, then values, of one tile
  extern __shared__ __align__(16) bf16 kv_s[];   // two stages: load the next tile during this one
  const int* tile = (decode ? a.decode_tiles : a.flash_tiles) + 3 * blockIdx.x;
  const int seq = tile[0], t0 = tile[1], ntok = tile[2];
  const int kvh = blockIdx.y;
  const int G = L.num_heads / L.num_kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = lane / 4, quad = lane % 4;
  const int* table = a.block_tables + static_cast<size_t>(seq) * a.max_blocks;
  const int first_pos = a.positions[t0];
  const int last_pos = a.positions[t0 + ntok - 1];
  // This block's share of the keys 0 .. last_pos.
  const int per_split = (last_pos + gridDim.z) / gridDim.z;
  const int k_begin = blockIdx.z * per_split;
  const int k_end = min(last_pos + 1, k_begin + per_split);

  // This thread's two rows (grp and grp + 8 of its warp's 16): token, head, position.
  int row_tok[2], row_pos[2];
  bool row_ok[2];
  uint32_t qf[D / 16][4]; // Q fragments for every 16-dim slice
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + grp + 8 * h;
    row_tok[h] = r / G;
    row_ok[h] = row_tok[h] < ntok && r < (flash_rows / G) * G;
    row_pos[h] = row_ok[h] ? first_pos + row_tok[h] : -1;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + grp + 8 * h;
      uint32_t lo = 0, hi = 0;
      if (row_ok[h]) {
        const bf16* q = a.qkv + static_cast<size_t>(t0 + row_tok[h]) * L.qkv_width() +
                        (kvh * G + r % G) * D + kk * 16 + quad * 2;
        lo = *reinterpret_cast<const uint32_t*>(q);
        hi = *reinterpret_cast<const uint32_t*>(q + 8);
      }
      qf[kk][h] = lo;     // a0 (row grp) / a1 (row grp + 8): dims quad*2, +1
      qf[kk][h + 2] = hi; // a2 / a3: dims 8 + quad*2, +1
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = a.scale * 1.4426950408889634f;

  // Keys and values k0 .. k0 + 63 into a stage (zeros past the last position), asynchronously.
  auto load_tile = [&](int k0, bf16* dst) {
    for (int idx = threadIdx.x; idx < flash_keys * (D / 8); idx += flash_threads) {
      const int key = idx / (D / 8), piece = idx % (D / 8);
      const int pos = k0 + key;
      const bool valid = pos < k_end;
      size_t off = 0;
      if (valid) {
        const size_t slot =
            static_cast<size_t>(table[pos / a.block_size]) * a.block_size + pos % a.block_size;
        off = (slot * L.num_kv_heads + kvh) * D + piece * 8;
      }
      cp_async16(dst + key * stride + piece * 8, a.k_cache + off, valid);
      cp_async16(dst + (flash_keys + key) * stride + piece * 8, a.v_cache + off, valid);
    }
    cp_async_commit();
  };
  if (k_begin < k_end)
    load_tile(k_begin, kv_s);
  for (int k0 = k_begin, it = 0; k0 < k_end; k0 += flash_keys, ++it) {
    const bf16* k_s = kv_s + (it % 2) * stage;
    const bf16* v_s = k_s + flash_keys * stride;
    if (k0 + flash_keys < k_end) {
      load_tile(k0 + flash_keys, kv_s + ((it + 1) % 2) * stage);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Warps without rows, or whose rows all lie before this tile, have nothing to add from it.
    if (warp * 16 < ntok * G && k0 <= first_pos + (warp * 16 + 15) / G)
      tile_step<D>(k_s, v_s, k0, k_end, qf, row_pos, scale_log2, m, l, o, lane);
    __syncthreads(); // this stage is loaded again two tiles from now
  }

  // Row sums are spread over the four threads of a row.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    if (!row_ok[h])
      continue;
    const int r = warp * 16 + grp + 8 * h;
    if (gridDim.z > 1) {
      // Partial results as the split-K kernel lays them out: D unnormalised outputs, then the
      // running max in natural-log units and the sum (zeros and -inf for an empty share).
      const int t = t0 + row_tok[h], head = kvh * G + r % G;
      float* p = a.partial +
                 ((static_cast<size_t>(t) * L.num_heads + head) * gridDim.z + blockIdx.z) * (D + 2);
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        p[n * 8 + quad * 2] = o[n][2 * h];
        p[n * 8 + quad * 2 + 1] = o[n][2 * h + 1];
      }
      if (quad == 0) {
        p[D] = m[h] * 0.6931471805599453f;
        p[D + 1] = l[h];
      }
      continue;
    }
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    bf16* out = a.out + (static_cast<size_t>(t0 + row_tok[h]) * L.num_heads + kvh * G + r % G) * D +
                quad * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<__nv_bfloat162*>(out + n * 8) =
          __floats2bfloat162_rn(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
  }
}

template <int D>
expected<void> launch_flash(const attention_args& a, head_layout L, bool decode, cudaStream_t s) {
  constexpr size_t smem = 2 * 2 * flash_keys * (D + 8) * sizeof(bf16);
  if constexpr (smem > 48 * 1024)
    TROUPE_CUDA(cudaFuncSetAttribute(flash_prefill_kernel<D>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const dim3 grid(decode ? a.num_split_tokens : a.num_flash_tiles, L.num_kv_heads,
                  decode ? a.num_splits : 1);
  TROUPE_CUDA(
      launch_pdl(flash_prefill_kernel<D>, grid, dim3(flash_threads), smem, s, a, L, decode));
  return {};
}

} // namespace

bool flash_prefill_supported(head_layout L) {
  const int D = L.head_dim, G = L.num_heads / L.num_kv_heads;
  return (D == 16 || D == 32 || D == 64 || D == 128) && G >= 1 && G <= flash_rows;
}

int flash_tile_tokens(head_layout L) {
  return flash_rows / (L.num_heads / L.num_kv_heads);
}

expected<void> flash_attention(const attention_args& a, head_layout L, bool decode,
                               cudaStream_t s) {
  if ((decode ? a.num_split_tokens : a.num_flash_tiles) == 0)
    return {};
  switch (L.head_dim) {
  case 16:
    return launch_flash<16>(a, L, decode, s);
  case 32:
    return launch_flash<32>(a, L, decode, s);
  case 64:
    return launch_flash<64>(a, L, decode, s);
  case 128:
    return launch_flash<128>(a, L, decode, s);
  default:
    return error{errc::unsupported, strf("flash attention: head_dim %d", L.head_dim)};
  }
}

} // namespace troupe::engine::cuda
