// Device-side mixture of experts (moe.cuh). Four or five launches per MoE layer, none of which
// depends on anything the host reads back, so a decode step with MoE layers is captured in a CUDA
// graph:
//   route     one warp per token: softmax over the router logits, top-k (ties to the lower expert
//             id, as the CPU reference's stable sort), optional renormalisation; for up to 32
//             tokens the permute block does this itself, one launch fewer;
//   permute   one block: counts per local expert, offsets and tile and active-expert lists by
//             warp scans, the (token, k) pairs stably sorted by expert (tokens ascending within
//             an expert);
//   gate/up   grouped GEMM over every active expert in one launch, gathering the token rows of
//             h through the permutation (no copy), silu(gate) * up in its epilogue;
//   down      the same over that activation;
//   combine   one block per token: the weighted sum of its k rows in k order (no atomics, so the
//             result is the same at every batch size and replay), added to the residual stream
//             and RMS-normalised for the next layer (or kept as a partial sum at tensor > 1).
// The grouped GEMM comes in two kinds, sized on the host from T alone (the device fills in which
// experts and rows): a CUDA-core kernel that streams only the active experts' weight rows (two
// rows per warp, 16-byte loads) for the smallest batches, and mma.sync tensor-core tiles of 64
// rows x 64 outputs (k steps of 64) with cp.async double buffering for larger ones. Blocks beyond
// the device's count of active experts or tiles return at once.
#include "engine/backend/cuda/moe.cuh"

#include <algorithm>

#include "engine/backend/cuda/device_math.cuh"

namespace troupe::engine::cuda {

namespace {

constexpr int permute_threads = 512;
constexpr int permute_warps = permute_threads / 32;
// Up to this many tokens the permutation block routes them itself (two per warp).
constexpr int fused_route_tokens = 2 * permute_warps;
constexpr int tile_rows = 64; // tensor-core tile: permuted rows
constexpr int tile_cols = 64; //                   outputs
constexpr int tile_k = 64;
constexpr int tile_stride = tile_k + 8; // bf16 per shared-memory row: 144 bytes, conflict-free
constexpr int tile_threads = 128;
constexpr int tile_pieces = tile_rows * tile_k / 8 / tile_threads; // 16-byte copies per thread

int max_tiles(const moe_dims& d, int tokens) {
  const int n = tokens * d.K;
  return (n + tile_rows - 1) / tile_rows + std::min(d.local(), n);
}

// (v1, e1) ranks before (v2, e2): higher probability, then the lower expert id.
__device__ __forceinline__ bool ranks_before(float v1, int e1, float v2, int e2) {
  return v1 > v2 || (v1 == v2 && e1 < e2);
}

// Routes token t with one warp: softmax over its router logits, the top k by (probability, lower
// id), optionally renormalised. Picks that find nothing (NaN logits) get id -1: no expert, no row.
__device__ void route_token(const float* __restrict__ logits, int t, int E, int K, bool norm,
                            int32_t* ids, float* weights, int lane) {
  const float* l = logits + static_cast<size_t>(t) * E;
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32)
    m = fmaxf(m, l[e]);
  m = warp_max(m);
  float z = 0.0f;
  for (int e = lane; e < E; e += 32)
    z += expf(l[e] - m);
  const float inv = 1.0f / warp_sum(z);
  // Pick k: the best pair ranking after pick k - 1. Lane k keeps pick k.
  float prev_v = INFINITY, mine_v = 0.0f, sum = 0.0f;
  int prev_e = -1, mine_e = -1;
  for (int k = 0; k < K; ++k) {
    float best_v = -INFINITY;
    int best_e = -1;
    for (int e = lane; e < E; e += 32) {
      const float p = expf(l[e] - m) * inv;
      if (ranks_before(prev_v, prev_e, p, e) &&
          (best_e < 0 || ranks_before(p, e, best_v, best_e))) {
        best_v = p;
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (oe >= 0 && (best_e < 0 || ranks_before(ov, oe, best_v, best_e))) {
        best_v = ov;
        best_e = oe;
      }
    }
    if (lane == k) {
      mine_v = best_v;
      mine_e = best_e;
    }
    if (best_e >= 0)
      sum += best_v;
    prev_v = best_v;
    prev_e = best_e;
  }
  if (lane < K) {
    ids[static_cast<size_t>(t) * K + lane] = mine_e;
    weights[static_cast<size_t>(t) * K + lane] = norm ? mine_v / sum : mine_v;
  }
}

// One warp per token (more than fused_route_tokens tokens).
__global__ void route_kernel(const float* __restrict__ logits, int T, int E, int K, bool norm,
                             int32_t* __restrict__ ids, float* __restrict__ weights) {
  pdl_wait();
  const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (t < T)
    route_token(logits, t, E, K, norm, ids, weights, threadIdx.x % 32);
}

// One block of permute_threads; shared memory: (5 + permute_warps) * L ints. With logits set, the
// block routes the tokens first (one launch fewer for decode-sized steps).
__global__ void __launch_bounds__(permute_threads)
    permute_kernel(const float* __restrict__ logits, int T, int E, bool norm, int32_t* ids,
                   float* weights, int K, int e0, int L, int32_t* __restrict__ slot,
                   int32_t* __restrict__ row_token, int32_t* __restrict__ offsets,
                   int32_t* __restrict__ active, int32_t* __restrict__ tiles) {
  pdl_wait();
  extern __shared__ int smem[];
  int* count = smem;              // [L] pairs per expert
  int* placed = smem + L;         // [L] rows of each expert placed by earlier chunks
  int* start = smem + 2 * L;      // [L] first row of each expert
  int* tile_start = smem + 3 * L; // [L] first tile of each expert
  int* active_at = smem + 4 * L;  // [L] position in the active list
  int* warp_count = smem + 5 * L; // [permute_warps][L] this chunk's pairs per warp and expert
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int N = T * K;
  if (logits != nullptr) {
    for (int t = warp; t < T; t += permute_warps)
      route_token(logits, t, E, K, norm, ids, weights, lane);
  }
  for (int e = tid; e < L; e += permute_threads)
    count[e] = placed[e] = 0;
  __syncthreads(); // also makes the routed ids visible to the block
  for (int i = tid; i < N; i += permute_threads) {
    const int e = ids[i] - e0;
    if (e >= 0 && e < L)
      atomicAdd(&count[e], 1);
  }
  __syncthreads();
  // Exclusive scans over the experts (rows, tiles, active experts) by warp 0, 32 at a time.
  if (warp == 0) {
    int rows = 0, nt = 0, na = 0;
    for (int b = 0; b < L; b += 32) {
      const int e = b + lane;
      const int c = e < L ? count[e] : 0, ct = (c + tile_rows - 1) / tile_rows, ca = c > 0;
      int sc = c, st = ct, sa = ca;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int vc = __shfl_up_sync(0xffffffffu, sc, o), vt = __shfl_up_sync(0xffffffffu, st, o),
                  va = __shfl_up_sync(0xffffffffu, sa, o);
        if (lane >= o) {
          sc += vc;
          st += vt;
          sa += va;
        }
      }
      if (e < L) {
        start[e] = rows + sc - c;
        tile_start[e] = nt + st - ct;
        active_at[e] = na + sa - ca;
      }
      rows += __shfl_sync(0xffffffffu, sc, 31);
      nt += __shfl_sync(0xffffffffu, st, 31);
      na += __shfl_sync(0xffffffffu, sa, 31);
    }
    if (lane == 0) {
      offsets[L] = rows;
      active[0] = na;
      tiles[0] = nt;
    }
  }
  __syncthreads();
  for (int e = tid; e < L; e += permute_threads) {
    offsets[e] = start[e];
    const int c = count[e];
    if (c > 0)
      active[1 + active_at[e]] = e;
    for (int j = 0; j * tile_rows < c; ++j) {
      tiles[1 + 2 * (tile_start[e] + j)] = e;
      tiles[2 + 2 * (tile_start[e] + j)] = start[e] + j * tile_rows;
    }
  }
  // Stable placement, permute_threads pairs at a time: a pair's rank within its expert is the
  // pairs of that expert before it in its warp (match), in earlier warps and in earlier chunks.
  for (int base = 0; base < N; base += permute_threads) {
    for (int j = tid; j < permute_warps * L; j += permute_threads)
      warp_count[j] = 0;
    __syncthreads();
    const int i = base + tid;
    int e = -1;
    if (i < N) {
      e = ids[i] - e0;
      if (e < 0 || e >= L)
        e = -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0)
      warp_count[warp * L + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int r = placed[e] + rank;
      for (int w = 0; w < warp; ++w)
        r += warp_count[w * L + e];
      const int pos = start[e] + r;
      slot[i] = pos;
      row_token[pos] = i / K;
    } else if (i < N) {
      slot[i] = -1;
    }
    __syncthreads();
    for (int x = tid; x < L; x += permute_threads) {
      int s = 0;
      for (int w = 0; w < permute_warps; ++w)
        s += warp_count[w * L + x];
      placed[x] += s;
    }
    __syncthreads();
  }
}

template <class Out>
__device__ __forceinline__ void store(Out* y, size_t i, float v) {
  if constexpr (sizeof(Out) == 4)
    y[i] = v;
  else
    y[i] = __float2bfloat16(v);
}

__device__ __forceinline__ float silu(float g) {
  return g / (1.0f + __expf(-g));
}

// Rows r0 .. r0 + n - 1 (n <= N) of one expert times two weight rows w0, w1 (each streamed once
// with 16-byte loads, four of each in flight per lane; the last round guarded, in = 768: three).
// Gated: y[r, col0] = silu(x w0) * (x w1) (gate and up rows of one activation column). Else
// y[r, col0] = x w0 and, when col1 < out, y[r, col1] = x w1.
template <int N, bool gated, class Out>
__device__ __forceinline__ void
skinny_rows(const uint4* __restrict__ w0, const uint4* __restrict__ w1, int chunks,
            const bf16* __restrict__ x, const int32_t* __restrict__ row_token, int in, int r0,
            int n, Out* __restrict__ y, int out, int col0, int col1, int lane) {
  const bf16* xr[N];
#pragma unroll
  for (int t = 0; t < N; ++t) {
    const int r = r0 + (t < n ? t : n - 1);
    xr[t] = x + static_cast<size_t>(row_token != nullptr ? row_token[r] : r) * in;
  }
  float acc0[N], acc1[N];
#pragma unroll
  for (int t = 0; t < N; ++t)
    acc0[t] = acc1[t] = 0.0f;
  constexpr int unroll = 4;
  for (int c0 = lane; c0 < chunks; c0 += 32 * unroll) {
    uint4 a[unroll], b[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u)
      if (c0 + 32 * u < chunks) {
        a[u] = __ldg(w0 + c0 + 32 * u);
        b[u] = __ldg(w1 + c0 + 32 * u);
      }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks)
        break;
      float af[8], bf[8];
      bf16x8_to_float(a[u], af);
      bf16x8_to_float(b[u], bf);
#pragma unroll
      for (int t = 0; t < N; ++t) {
        float xf[8];
        bf16x8_to_float(*reinterpret_cast<const uint4*>(xr[t] + 8 * c), xf);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          acc0[t] += af[k] * xf[k];
          acc1[t] += bf[k] * xf[k];
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < N; ++t) {
    const float v0 = warp_sum(acc0[t]), v1 = warp_sum(acc1[t]);
    if (lane != 0 || t >= n)
      continue;
    const size_t row = static_cast<size_t>(r0 + t) * out;
    if constexpr (gated) {
      store(y, row + col0, silu(v0) * v1);
    } else {
      store(y, row + col0, v0);
      if (col1 < out)
        store(y, row + col1, v1);
    }
  }
}

// Grid (ceil(out / 16) non-gated or ceil(out / 8) gated, max active experts); block y serves the
// y-th active expert, two weight rows per warp. For each of the expert's permuted rows r, with
// x_r = x[row_token[r] or r]: gated (w_e = [gate; up], [2 out, in]) y[r, :] = silu(x_r gate^T) *
// (x_r up^T); else y[r, :] = x_r w_e^T ([out, in]).
template <bool gated, class Out>
__global__ void __launch_bounds__(256)
    skinny_kernel(const bf16* __restrict__ x, const int32_t* __restrict__ row_token, int in,
                  const bf16* __restrict__ w, int out, const int32_t* __restrict__ offsets,
                  const int32_t* __restrict__ active, Out* __restrict__ y) {
  pdl_wait();
  if (static_cast<int>(blockIdx.y) >= active[0])
    return;
  const int e = active[1 + blockIdx.y];
  const int warp = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col0 = gated ? warp : 2 * warp, col1 = gated ? warp : 2 * warp + 1;
  if (col0 >= out)
    return;
  const size_t rows = gated ? 2 * static_cast<size_t>(out) : out;
  const bf16* we = w + static_cast<size_t>(e) * rows * in;
  const int row1 = gated ? out + col0 : min(col1, out - 1); // a valid row to stream either way
  const uint4* w0 = reinterpret_cast<const uint4*>(we + static_cast<size_t>(col0) * in);
  const uint4* w1 = reinterpret_cast<const uint4*>(we + static_cast<size_t>(row1) * in);
  const int begin = offsets[e], end = offsets[e + 1];
  const int chunks = in / 8;
  for (int r0 = begin; r0 < end; r0 += 4) {
    const int n = min(4, end - r0);
    if (n > 2)
      skinny_rows<4, gated>(w0, w1, chunks, x, row_token, in, r0, n, y, out, col0, col1, lane);
    else if (n == 2)
      skinny_rows<2, gated>(w0, w1, chunks, x, row_token, in, r0, n, y, out, col0, col1, lane);
    else
      skinny_rows<1, gated>(w0, w1, chunks, x, row_token, in, r0, n, y, out, col0, col1, lane);
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global -> shared; zero-filled (nothing read) when !valid.
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

// Grid (ceil(out / 64) non-gated or ceil(out / 32) gated, max tiles); block y computes tile y (64
// permuted rows of one expert) times 64 weight rows. Four warps of 32 x 32; mma.sync m16n8k16 with
// ldmatrix operands. Gated (w_e = [gate; up], [2 out, in]): each warp's 32 weight rows are 16 gate
// rows then the 16 up rows of the same activation columns, so a thread holds both halves of its
// outputs and writes silu(gate) * up.
template <bool gated, class Out>
__global__ void __launch_bounds__(tile_threads)
    tile_kernel(const bf16* __restrict__ x, const int32_t* __restrict__ row_token, int in,
                const bf16* __restrict__ w, int out, const int32_t* __restrict__ offsets,
                const int32_t* __restrict__ tiles, Out* __restrict__ y) {
  pdl_wait();
  if (static_cast<int>(blockIdx.y) >= tiles[0])
    return;
  __shared__ __align__(16) bf16 a_s[2][tile_rows * tile_stride];
  __shared__ __align__(16) bf16 b_s[2][tile_cols * tile_stride];
  const int e = tiles[1 + 2 * blockIdx.y], row0 = tiles[2 + 2 * blockIdx.y];
  const int row_end = min(offsets[e + 1], row0 + tile_rows);
  const int n0 = blockIdx.x * (gated ? tile_cols / 2 : tile_cols);
  const bf16* we = w + static_cast<size_t>(e) * (gated ? 2 : 1) * out * in;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Each thread copies tile_pieces 16-byte pieces of A and as many of B per k-tile.
  const bf16* a_src[tile_pieces];
  const bf16* b_src[tile_pieces];
  bool a_ok[tile_pieces], b_ok[tile_pieces];
  int s_off[tile_pieces], k_off[tile_pieces];
#pragma unroll
  for (int j = 0; j < tile_pieces; ++j) {
    const int c = tid + tile_threads * j, r = c / (tile_k / 8);
    k_off[j] = (c % (tile_k / 8)) * 8;
    s_off[j] = r * tile_stride + k_off[j];
    const int gr = row0 + r;
    a_ok[j] = gr < row_end;
    const int src = a_ok[j] ? (row_token != nullptr ? row_token[gr] : gr) : 0;
    a_src[j] = x + static_cast<size_t>(src) * in + k_off[j];
    // Gated: shared row r holds gate or up row j of activation column j.
    const int j_col = gated ? n0 + (r / 32) * 16 + r % 16 : n0 + r;
    b_ok[j] = j_col < out;
    const int w_row = gated && r % 32 >= 16 ? out + j_col : j_col;
    b_src[j] = we + static_cast<size_t>(b_ok[j] ? w_row : 0) * in + k_off[j];
  }
  auto load = [&](int stage, int k0) {
#pragma unroll
    for (int j = 0; j < tile_pieces; ++j) {
      const bool k_ok = k0 + k_off[j] < in;
      cp_async16(&a_s[stage][s_off[j]], a_src[j] + (k_ok ? k0 : 0), a_ok[j] && k_ok);
      cp_async16(&b_s[stage][s_off[j]], b_src[j] + (k_ok ? k0 : 0), b_ok[j] && k_ok);
    }
    cp_async_commit();
  };
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        acc[mi][ni][q] = 0.0f;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int k_tiles = (in + tile_k - 1) / tile_k;
  load(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) {
      load((kt + 1) % 2, (kt + 1) * tile_k);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* as = a_s[kt % 2];
    const bf16* bs = b_s[kt % 2];
#pragma unroll
    for (int kk = 0; kk < tile_k; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], as + (wm + mi * 16 + lane % 16) * tile_stride + kk + (lane / 16) * 8);
#pragma unroll
      for (int nj = 0; nj < 4; nj += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, bs + (wn + nj * 8 + (lane / 16) * 8 + lane % 8) * tile_stride + kk +
                           ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_bf16(acc[mi][nj], af[mi], b[0], b[1]);
          mma_bf16(acc[mi][nj + 1], af[mi], b[2], b[3]);
        }
      }
    }
    __syncthreads(); // the stage is overwritten by the load two iterations on
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < (gated ? 2 : 4); ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = row0 + wm + mi * 16 + lane / 4 + (q / 2) * 8;
        const int col = n0 + (gated ? wn / 2 : wn) + ni * 8 + (lane % 4) * 2 + q % 2;
        if (r < row_end && col < out)
          store(y, static_cast<size_t>(r) * out + col,
                gated ? silu(acc[mi][ni][q]) * acc[mi][ni + 2][q] : acc[mi][ni][q]);
      }
}

// Sum over a block of blockDim.x (a multiple of 32, at most 1024) threads; all threads get it.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
    part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < static_cast<int>(blockDim.x / 32) ? part[lane] : 0.0f;
    x = warp_sum(x);
    if (lane == 0)
      total = x;
  }
  __syncthreads();
  return total;
}

// One block per token: sum = the sum over k of w(t, k) * down[slot(t, k)], in k order. Then
// either partial[t] = sum, or resid[t] += sum and normed[t] = rmsnorm(resid[t]) * norm.
__global__ void combine_kernel(const float* __restrict__ down, const int32_t* __restrict__ slot,
                               const float* __restrict__ weights, int K, int H, moe_output o) {
  pdl_wait();
  const int t = blockIdx.x;
  const int32_t* sl = slot + static_cast<size_t>(t) * K;
  const float* wt = weights + static_cast<size_t>(t) * K;
  const size_t row = static_cast<size_t>(t) * H;
  float ss = 0.0f;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int s = sl[k];
      if (s >= 0)
        acc += wt[k] * down[static_cast<size_t>(s) * H + h];
    }
    if (o.partial != nullptr) {
      o.partial[row + h] = acc;
    } else {
      const float v = o.resid[row + h] + acc;
      o.resid[row + h] = v;
      ss += v * v;
    }
  }
  if (o.partial != nullptr)
    return;
  const float inv = rsqrtf(block_sum(ss) / H + o.eps);
  for (int h = threadIdx.x; h < H; h += blockDim.x)
    o.normed[row + h] = __float2bfloat16(o.norm[h] * (o.resid[row + h] * inv));
}

template <bool gated, class Out>
cudaError_t grouped_gemm(bool skinny, const moe_dims& d, const bf16* x, const int32_t* row_token,
                         int in, const bf16* w, int out, const moe_workspace& ws, Out* y,
                         cudaStream_t s) {
  const int n = d.pairs();
  if (skinny) {
    const int per_block = gated ? 8 : 16;
    return launch_pdl(skinny_kernel<gated, Out>,
                      dim3((out + per_block - 1) / per_block, std::min(d.local(), n)), dim3(256), 0,
                      s, x, row_token, in, w, out, ws.offsets, ws.active, y);
  }
  const int per_block = gated ? tile_cols / 2 : tile_cols;
  return launch_pdl(tile_kernel<gated, Out>,
                    dim3((out + per_block - 1) / per_block, max_tiles(d, d.T)), dim3(tile_threads),
                    0, s, x, row_token, in, w, out, ws.offsets, ws.tiles, y);
}

size_t aligned(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

} // namespace

expected<void> moe_supported(const moe_dims& d) {
  if (d.E <= 0 || d.K <= 0 || d.K > d.E || d.K > moe_max_topk)
    return error{errc::unsupported, strf("CUDA MoE: %d experts per token of %d (supported: 1..%d)",
                                         d.K, d.E, moe_max_topk)};
  if (d.local() <= 0 || d.local() > moe_max_local_experts || d.expert_begin < 0 ||
      d.expert_end > d.E)
    return error{errc::unsupported,
                 strf("CUDA MoE: experts [%d, %d) of %d on one GPU (supported: 1..%d)",
                      d.expert_begin, d.expert_end, d.E, moe_max_local_experts)};
  if (d.H % 8 != 0 || d.I % 8 != 0)
    return error{
        errc::unsupported,
        strf("CUDA MoE: hidden_size %d and moe_intermediate_size %d must be multiples of 8", d.H,
             d.I)};
  return {};
}

size_t moe_workspace_bytes(const moe_dims& d, int max_tokens) {
  const size_t n = static_cast<size_t>(max_tokens) * d.K, L = static_cast<size_t>(d.local());
  return 4 * aligned(n * 4) + aligned((L + 1) * 4) + aligned((L + 1) * 4) +
         aligned((1 + 2 * static_cast<size_t>(max_tiles(d, max_tokens))) * 4) +
         aligned(n * d.I * 2) + aligned(n * d.H * 4);
}

moe_workspace moe_carve(void* base, const moe_dims& d, int max_tokens) {
  const size_t n = static_cast<size_t>(max_tokens) * d.K, L = static_cast<size_t>(d.local());
  char* p = static_cast<char*>(base);
  auto take = [&](size_t bytes) {
    void* q = p;
    p += aligned(bytes);
    return q;
  };
  moe_workspace ws;
  ws.topk_ids = static_cast<int32_t*>(take(n * 4));
  ws.topk_w = static_cast<float*>(take(n * 4));
  ws.slot = static_cast<int32_t*>(take(n * 4));
  ws.row_token = static_cast<int32_t*>(take(n * 4));
  ws.offsets = static_cast<int32_t*>(take((L + 1) * 4));
  ws.active = static_cast<int32_t*>(take((L + 1) * 4));
  ws.tiles =
      static_cast<int32_t*>(take((1 + 2 * static_cast<size_t>(max_tiles(d, max_tokens))) * 4));
  ws.act = static_cast<bf16*>(take(n * d.I * 2));
  ws.down = static_cast<float*>(take(n * d.H * 4));
  return ws;
}

expected<void> moe_forward(const moe_dims& d, const float* router_logits, const bf16* h,
                           const bf16* gate_up, const bf16* down, const moe_workspace& ws,
                           const moe_output& out, moe_path path, cudaStream_t s) {
  if (d.T == 0)
    return {};
  TROUPE_TRY_VOID(moe_supported(d));
  const int n = d.pairs(), L = d.local();
  const bool fused = d.T <= fused_route_tokens;
  if (!fused)
    TROUPE_CUDA(launch_pdl(route_kernel, dim3((d.T + 7) / 8), dim3(256), 0, s, router_logits, d.T,
                           d.E, d.K, d.norm_topk_prob, ws.topk_ids, ws.topk_w));
  const size_t smem = static_cast<size_t>(5 + permute_warps) * L * 4;
  TROUPE_CUDA(launch_pdl(permute_kernel, dim3(1), dim3(permute_threads), smem, s,
                         fused ? router_logits : nullptr, d.T, d.E, d.norm_topk_prob, ws.topk_ids,
                         ws.topk_w, d.K, d.expert_begin, L, ws.slot, ws.row_token, ws.offsets,
                         ws.active, ws.tiles));
  const bool skinny = path == moe_path::skinny ||
                      (path == moe_path::auto_path && n * moe_skinny_experts_per_pair <= L);
  // gate/up with silu * up in the epilogue, then down.
  TROUPE_CUDA(grouped_gemm<true>(skinny, d, h, ws.row_token, d.H, gate_up, d.I, ws, ws.act, s));
  TROUPE_CUDA(grouped_gemm<false>(skinny, d, ws.act, nullptr, d.I, down, d.H, ws, ws.down, s));
  int threads = 32;
  while (threads < d.H / 4 && threads < 1024)
    threads *= 2;
  TROUPE_CUDA(launch_pdl(combine_kernel, dim3(d.T), dim3(threads), 0, s, ws.down, ws.slot,
                         ws.topk_w, d.K, d.H, out));
  return {};
}

} // namespace troupe::engine::cuda
