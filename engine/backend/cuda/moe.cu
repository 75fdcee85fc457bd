// Device-side mixture of experts (moe.cuh). Five launches per MoE layer, none of which depends on
// anything the host reads back, so a decode step with MoE layers is captured in a CUDA graph:
//   route     one warp per token: softmax over the router logits, top-k (ties to the lower expert
//             id, as the CPU reference's stable sort), optional renormalisation;
//   permute   one block: counts per local expert, offsets, the (token, k) pairs stably sorted by
//             expert (tokens ascending within an expert), the active-expert list and the 64-row
//             tile list the grouped GEMMs read;
//   gate/up   grouped GEMM over every active expert in one launch, gathering the token rows of
//             h through the permutation (no copy);
//   down      the same over silu(gate) * up;
//   combine   one block per token: the weighted sum of its k rows in k order (no atomics, so the
//             result is the same at every batch size and replay).
// The grouped GEMM comes in two kinds, sized on the host from T alone (the device fills in which
// experts and rows): a CUDA-core kernel that streams only the active experts' weight rows (one
// warp per row, 16-byte loads) for decode-sized batches, and mma.sync tensor-core tiles of 64
// rows x 64 outputs with cp.async double buffering for larger ones. Blocks beyond the device's
// count of active experts or tiles return at once.
#include "engine/backend/cuda/moe.cuh"

#include <algorithm>

#include "engine/backend/cuda/device_math.cuh"
#include "engine/backend/cuda/kernels.cuh"

namespace troupe::engine::cuda {

namespace {

constexpr int permute_threads = 512;
constexpr int permute_warps = permute_threads / 32;
constexpr int tile_rows = 64; // tensor-core tile: permuted rows
constexpr int tile_cols = 64; //                   outputs
constexpr int tile_k = 32;
constexpr int tile_stride = tile_k + 8; // bf16 per shared-memory row: 80 bytes, conflict-free
constexpr int tile_threads = 128;

int max_tiles(const moe_dims& d, int tokens) {
  const int n = tokens * d.K;
  return (n + tile_rows - 1) / tile_rows + std::min(d.local(), n);
}

// (v1, e1) ranks before (v2, e2): higher probability, then the lower expert id.
__device__ __forceinline__ bool ranks_before(float v1, int e1, float v2, int e2) {
  return v1 > v2 || (v1 == v2 && e1 < e2);
}

__global__ void route_kernel(const float* __restrict__ logits, int T, int E, int K, bool norm,
                             int32_t* __restrict__ ids, float* __restrict__ weights) {
  pdl_wait();
  const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= T)
    return;
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
    // A pick that found nothing (NaN logits) gets id -1: no expert, no row.
    ids[static_cast<size_t>(t) * K + lane] = mine_e;
    weights[static_cast<size_t>(t) * K + lane] = norm ? mine_v / sum : mine_v;
  }
}

// One block of permute_threads; shared memory: (3 + permute_warps) * L ints.
__global__ void __launch_bounds__(permute_threads)
    permute_kernel(const int32_t* __restrict__ ids, int N, int K, int e0, int L,
                   int32_t* __restrict__ slot, int32_t* __restrict__ row_token,
                   int32_t* __restrict__ offsets, int32_t* __restrict__ active,
                   int32_t* __restrict__ tiles) {
  pdl_wait();
  extern __shared__ int smem[];
  int* count = smem;              // [L]
  int* placed = smem + L;         // [L] rows of each expert placed by earlier chunks
  int* start = smem + 2 * L;      // [L] first row of each expert
  int* warp_count = smem + 3 * L; // [permute_warps][L] this chunk's pairs per warp and expert
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int e = tid; e < L; e += permute_threads)
    count[e] = placed[e] = 0;
  __syncthreads();
  for (int i = tid; i < N; i += permute_threads) {
    const int e = ids[i] - e0;
    if (e >= 0 && e < L)
      atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int off = 0, na = 0, nt = 0;
    for (int e = 0; e < L; ++e) {
      start[e] = off;
      offsets[e] = off;
      const int c = count[e];
      if (c > 0)
        active[1 + na++] = e;
      for (int r = 0; r < c; r += tile_rows, ++nt) {
        tiles[1 + 2 * nt] = e;
        tiles[2 + 2 * nt] = off + r;
      }
      off += c;
    }
    offsets[L] = off;
    active[0] = na;
    tiles[0] = nt;
  }
  __syncthreads();
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

// Rows r0 .. r0 + n - 1 (n <= N) of one expert times weight row `col`: N accumulators per lane,
// the weight row streamed once with 16-byte loads, four in flight.
template <int N, class Out>
__device__ __forceinline__ void
skinny_rows(const uint4* __restrict__ wr, int chunks, const bf16* __restrict__ x,
            const int32_t* __restrict__ row_token, int in, int r0, int n, Out* __restrict__ y,
            int out, int col, int lane) {
  const bf16* xr[N];
#pragma unroll
  for (int t = 0; t < N; ++t) {
    const int r = r0 + (t < n ? t : n - 1);
    xr[t] = x + static_cast<size_t>(row_token != nullptr ? row_token[r] : r) * in;
  }
  float acc[N];
#pragma unroll
  for (int t = 0; t < N; ++t)
    acc[t] = 0.0f;
  constexpr int unroll = 4;
  int c = lane;
  for (; c + 32 * (unroll - 1) < chunks; c += 32 * unroll) {
    uint4 wv[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u)
      wv[u] = __ldg(wr + c + 32 * u);
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      float wf[8];
      bf16x8_to_float(wv[u], wf);
#pragma unroll
      for (int t = 0; t < N; ++t) {
        float xf[8];
        bf16x8_to_float(*reinterpret_cast<const uint4*>(xr[t] + 8 * (c + 32 * u)), xf);
#pragma unroll
        for (int k = 0; k < 8; ++k)
          acc[t] += wf[k] * xf[k];
      }
    }
  }
  for (; c < chunks; c += 32) {
    float wf[8];
    bf16x8_to_float(__ldg(wr + c), wf);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      float xf[8];
      bf16x8_to_float(*reinterpret_cast<const uint4*>(xr[t] + 8 * c), xf);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        acc[t] += wf[k] * xf[k];
    }
  }
#pragma unroll
  for (int t = 0; t < N; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0 && t < n)
      store(y, static_cast<size_t>(r0 + t) * out + col, v);
  }
}

// Grid (ceil(out / 8), max active experts); block y serves the y-th active expert, one warp per
// weight row. y[row, :] = x[row_token[row] or row, :] . w_e^T for the expert's permuted rows.
template <class Out>
__global__ void __launch_bounds__(256)
    skinny_kernel(const bf16* __restrict__ x, const int32_t* __restrict__ row_token, int in,
                  const bf16* __restrict__ w, int out, const int32_t* __restrict__ offsets,
                  const int32_t* __restrict__ active, Out* __restrict__ y) {
  pdl_wait();
  if (static_cast<int>(blockIdx.y) >= active[0])
    return;
  const int e = active[1 + blockIdx.y];
  const int col = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (col >= out)
    return;
  const int begin = offsets[e], end = offsets[e + 1];
  const uint4* wr = reinterpret_cast<const uint4*>(w + (static_cast<size_t>(e) * out + col) * in);
  const int chunks = in / 8;
  for (int r0 = begin; r0 < end; r0 += 8) {
    const int n = min(8, end - r0);
    if (n > 4)
      skinny_rows<8>(wr, chunks, x, row_token, in, r0, n, y, out, col, lane);
    else if (n > 2)
      skinny_rows<4>(wr, chunks, x, row_token, in, r0, n, y, out, col, lane);
    else if (n == 2)
      skinny_rows<2>(wr, chunks, x, row_token, in, r0, n, y, out, col, lane);
    else
      skinny_rows<1>(wr, chunks, x, row_token, in, r0, n, y, out, col, lane);
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

// Grid (ceil(out / 64), max tiles); block y computes tile y (64 permuted rows of one expert) times
// 64 weight rows. Four warps of 32 x 32; mma.sync m16n8k16 with ldmatrix operands.
template <class Out>
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
  const int n0 = blockIdx.x * tile_cols;
  const bf16* we = w + static_cast<size_t>(e) * out * in;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Each thread copies two 16-byte pieces of A and two of B per k-tile.
  const bf16* a_src[2];
  const bf16* b_src[2];
  bool a_ok[2], b_ok[2];
  int s_off[2], k_off[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int c = tid + tile_threads * j, r = c / 4;
    k_off[j] = (c % 4) * 8;
    s_off[j] = r * tile_stride + k_off[j];
    const int gr = row0 + r;
    a_ok[j] = gr < row_end;
    const int src = a_ok[j] ? (row_token != nullptr ? row_token[gr] : gr) : 0;
    a_src[j] = x + static_cast<size_t>(src) * in + k_off[j];
    b_ok[j] = n0 + r < out;
    b_src[j] = we + static_cast<size_t>(b_ok[j] ? n0 + r : 0) * in + k_off[j];
  }
  auto load = [&](int stage, int k0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
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
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = row0 + wm + mi * 16 + lane / 4 + (q / 2) * 8;
        const int col = n0 + wn + ni * 8 + (lane % 4) * 2 + q % 2;
        if (r < row_end && col < out)
          store(y, static_cast<size_t>(r) * out + col, acc[mi][ni][q]);
      }
}

// One block per token: out[t] = sum over k of w(t, k) * down[slot(t, k)], in k order.
template <class Out>
__global__ void combine_kernel(const float* __restrict__ down, const int32_t* __restrict__ slot,
                               const float* __restrict__ weights, int K, int H,
                               Out* __restrict__ out) {
  pdl_wait();
  const int t = blockIdx.x;
  const int32_t* sl = slot + static_cast<size_t>(t) * K;
  const float* wt = weights + static_cast<size_t>(t) * K;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int s = sl[k];
      if (s >= 0)
        acc += wt[k] * down[static_cast<size_t>(s) * H + h];
    }
    store(out, static_cast<size_t>(t) * H + h, acc);
  }
}

template <class Out>
cudaError_t grouped_gemm(bool skinny, const moe_dims& d, const bf16* x, const int32_t* row_token,
                         int in, const bf16* w, int out, const moe_workspace& ws, Out* y,
                         cudaStream_t s) {
  const int n = d.pairs();
  if (skinny)
    return launch_pdl(skinny_kernel<Out>, dim3((out + 7) / 8, std::min(d.local(), n)), dim3(256), 0,
                      s, x, row_token, in, w, out, ws.offsets, ws.active, y);
  return launch_pdl(tile_kernel<Out>, dim3((out + tile_cols - 1) / tile_cols, max_tiles(d, d.T)),
                    dim3(tile_threads), 0, s, x, row_token, in, w, out, ws.offsets, ws.tiles, y);
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
         aligned(n * 2 * d.I * 2) + aligned(n * d.I * 2) + aligned(n * d.H * 4);
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
  ws.gate_up = static_cast<bf16*>(take(n * 2 * d.I * 2));
  ws.act = static_cast<bf16*>(take(n * d.I * 2));
  ws.down = static_cast<float*>(take(n * d.H * 4));
  return ws;
}

expected<void> moe_forward(const moe_dims& d, const float* router_logits, const bf16* h,
                           const bf16* gate_up, const bf16* down, const moe_workspace& ws,
                           float* out_f32, bf16* out_bf16, moe_path path, cudaStream_t s) {
  if (d.T == 0)
    return {};
  TROUPE_TRY_VOID(moe_supported(d));
  const int n = d.pairs(), L = d.local();
  TROUPE_CUDA(launch_pdl(route_kernel, dim3((d.T + 7) / 8), dim3(256), 0, s, router_logits, d.T,
                         d.E, d.K, d.norm_topk_prob, ws.topk_ids, ws.topk_w));
  const size_t smem = static_cast<size_t>(3 + permute_warps) * L * 4;
  TROUPE_CUDA(launch_pdl(permute_kernel, dim3(1), dim3(permute_threads), smem, s, ws.topk_ids, n,
                         d.K, d.expert_begin, L, ws.slot, ws.row_token, ws.offsets, ws.active,
                         ws.tiles));
  const bool skinny =
      path == moe_path::skinny || (path == moe_path::auto_path && n <= moe_skinny_rows * L);
  TROUPE_CUDA(grouped_gemm(skinny, d, h, ws.row_token, d.H, gate_up, 2 * d.I, ws, ws.gate_up, s));
  // Every row the buffers can hold: rows past this rank's pairs are never read back.
  TROUPE_TRY_VOID(silu_mul(ws.gate_up, n, d.I, ws.act, s));
  TROUPE_CUDA(grouped_gemm<float>(skinny, d, ws.act, nullptr, d.I, down, d.H, ws, ws.down, s));
  if (out_f32 != nullptr)
    TROUPE_CUDA(launch_pdl(combine_kernel<float>, dim3(d.T), dim3(256), 0, s, ws.down, ws.slot,
                           ws.topk_w, d.K, d.H, out_f32));
  else
    TROUPE_CUDA(launch_pdl(combine_kernel<bf16>, dim3(d.T), dim3(256), 0, s, ws.down, ws.slot,
                           ws.topk_w, d.K, d.H, out_bf16));
  return {};
}

} // namespace troupe::engine::cuda
