#include "engine/backend/cuda/gemm.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "engine/backend/cuda/device_math.cuh"

namespace troupe::engine::cuda {

namespace {

// One warp per output row: streams the weight row with 16-byte loads (4 in flight per lane) and
// dots it with every token's input row (read through L1; they are small).
template <int T, class Out>
__global__ void __launch_bounds__(256)
    skinny_kernel(const bf16* __restrict__ x, int in, const bf16* __restrict__ w, int out,
                  Out* __restrict__ y) {
  pdl_wait();
  pdl_trigger();
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= out)
    return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * in);
  const int chunks = in / 8;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t)
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
      for (int t = 0; t < T; ++t) {
        float xf[8];
        bf16x8_to_float(
            *reinterpret_cast<const uint4*>(x + static_cast<size_t>(t) * in + 8 * (c + 32 * u)),
            xf);
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
    for (int t = 0; t < T; ++t) {
      float xf[8];
      bf16x8_to_float(*reinterpret_cast<const uint4*>(x + static_cast<size_t>(t) * in + 8 * c), xf);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        acc[t] += wf[k] * xf[k];
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) {
      if constexpr (sizeof(Out) == 4)
        y[static_cast<size_t>(t) * out + row] = v;
      else
        y[static_cast<size_t>(t) * out + row] = __float2bfloat16(v);
    }
  }
}

template <class Out>
cudaError_t launch_skinny(const bf16* x, int T, int in, const bf16* w, int out, Out* y,
                          cudaStream_t s) {
  // One instantiation per row count 1..8 (T above 8 never reaches here).
  using kernel = void (*)(const bf16*, int, const bf16*, int, Out*);
  static constexpr kernel kernels[] = {
      skinny_kernel<1, Out>, skinny_kernel<2, Out>, skinny_kernel<3, Out>, skinny_kernel<4, Out>,
      skinny_kernel<5, Out>, skinny_kernel<6, Out>, skinny_kernel<7, Out>, skinny_kernel<8, Out>};
  const dim3 grid((out + 7) / 8), block(256);
  return launch_pdl(kernels[std::clamp(T, 1, 8) - 1], grid, block, 0, s, x, in, w, out, y);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

} // namespace

expected<void> skinny_gemm(const bf16* x, int T, int in, const bf16* w, int out, void* y,
                           bool f32_out, cudaStream_t s) {
  if (T < 1 || T > gemm_runner::skinny_max_tokens || in % 8 != 0 || !aligned16(x) || !aligned16(w))
    return error{errc::invalid_argument, strf("skinny_gemm: T=%d in=%d not supported", T, in)};
  if (f32_out)
    TROUPE_CUDA(launch_skinny(x, T, in, w, out, static_cast<float*>(y), s));
  else
    TROUPE_CUDA(launch_skinny(x, T, in, w, out, static_cast<bf16*>(y), s));
  return {};
}

gemm_runner::~gemm_runner() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (handle_ != nullptr)
    cublasLtDestroy(handle_);
}

expected<void> gemm_runner::init(size_t workspace_bytes) {
  if (const char* env = std::getenv("TROUPE_GEMM_AUTOTUNE"))
    autotune = std::strcmp(env, "0") != 0;
  TROUPE_CUBLAS(cublasLtCreate(&handle_));
  return workspace_.allocate(workspace_bytes);
}

expected<void> gemm_runner::run(const bf16* x, int T, int in, const bf16* w, int out, bf16* y,
                                cudaStream_t s) {
  if (T == 0) // a step whose sequences want no logits rows
    return {};
  if (use_skinny && T <= skinny_auto_tokens && in % 8 == 0 && aligned16(x) && aligned16(w))
    return skinny_gemm(x, T, in, w, out, y, false, s);
  return run_lt(x, T, in, w, out, y, false, s);
}

expected<void> gemm_runner::run(const bf16* x, int T, int in, const bf16* w, int out, float* y,
                                cudaStream_t s) {
  if (T == 0) // a step whose sequences want no logits rows
    return {};
  if (use_skinny && T <= skinny_auto_tokens && in % 8 == 0 && aligned16(x) && aligned16(w))
    return skinny_gemm(x, T, in, w, out, y, true, s);
  return run_lt(x, T, in, w, out, y, true, s);
}

cublasLtMatmulAlgo_t gemm_runner::fastest(const plan& p,
                                          const cublasLtMatmulHeuristicResult_t* results, int found,
                                          const bf16* x, const bf16* w, void* y, cudaStream_t s) {
  // Timing needs a stream that is not being captured into a graph (the backend runs a step
  // eagerly before capturing it, so plans are made outside capture).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaStreamIsCapturing(s, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone || cudaEventCreate(&start) != cudaSuccess ||
      cudaEventCreate(&stop) != cudaSuccess) {
    if (start != nullptr)
      cudaEventDestroy(start);
    return results[0].algo;
  }
  const float alpha = 1.0f, beta = 0.0f;
  float best_ms = INFINITY;
  cublasLtMatmulAlgo_t best = results[0].algo;
  for (int i = 0; i < found; ++i) {
    // One warm-up run, then three timed; a candidate that fails is skipped.
    bool ok = true;
    for (int r = 0; r < 4 && ok; ++r) {
      if (r == 1)
        cudaEventRecord(start, s);
      ok = cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                          &results[i].algo, workspace_.as<void>(), workspace_.bytes(),
                          s) == CUBLAS_STATUS_SUCCESS;
    }
    if (!ok)
      continue;
    cudaEventRecord(stop, s);
    float ms = 0;
    if (cudaEventSynchronize(stop) == cudaSuccess &&
        cudaEventElapsedTime(&ms, start, stop) == cudaSuccess && ms < best_ms) {
      best_ms = ms;
      best = results[i].algo;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return best;
}

void gemm_runner::settle(plan& p, int T, int in, int out, bool f32_out, const bf16* x,
                         const bf16* w, void* y, cudaStream_t s) {
  const auto bucket = std::tuple{size_bucket(T), in, out, f32_out};
  if (auto tuned = tuned_.find(bucket); tuned != tuned_.end()) {
    cublasLtMatmulHeuristicResult_t check{};
    if (cublasLtMatmulAlgoCheck(handle_, p.op, p.a, p.b, p.c, p.c, &tuned->second, &check) ==
        CUBLAS_STATUS_SUCCESS)
      p.algo = tuned->second;
    p.num_candidates = 0; // settled: the bucket's algorithm, or the heuristic's first
    return;
  }
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (!time_new_shapes || cudaStreamIsCapturing(s, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone)
    return; // the heuristic's first until a step that may be timed meets this bucket
  p.algo = fastest(p, p.candidates, p.num_candidates, x, w, y, s);
  tuned_.emplace(bucket, p.algo);
  p.num_candidates = 0;
}

expected<void> gemm_runner::run_lt(const bf16* x, int T, int in, const bf16* w, int out, void* y,
                                   bool f32_out, cudaStream_t s) {
  if (T == 0)
    return {};
  // Column-major view: y^T [out, T] = w^T(op T of the stored [in, out]) · x^T [in, T].
  auto key = std::tuple{T, in, out, f32_out};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    plan p;
    TROUPE_CUBLAS(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    TROUPE_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                                 sizeof(trans_a)));
    TROUPE_CUBLAS(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                                 sizeof(trans_b)));
    TROUPE_CUBLAS(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, in, out, in));
    TROUPE_CUBLAS(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, in, T, in));
    TROUPE_CUBLAS(
        cublasLtMatrixLayoutCreate(&p.c, f32_out ? CUDA_R_32F : CUDA_R_16BF, out, T, out));
    cublasLtMatmulPreference_t pref = nullptr;
    TROUPE_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = workspace_.bytes();
    TROUPE_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t results[autotune_candidates];
    std::memset(results, 0, sizeof(results));
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref,
                                                       autotune_candidates, results, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      return error{errc::unsupported,
                   strf("cuBLASLt has no algorithm for [%dx%d]·[%dx%d]^T", T, in, out, in)};
    p.algo = results[0].algo;
    if (autotune && T <= autotune_max_tokens && found > 1) { // timed once its bucket is
      std::copy(results, results + found, p.candidates);
      p.num_candidates = found;
    }
    it = plans_.emplace(key, p).first;
  }
  if (it->second.num_candidates > 0)
    settle(it->second, T, in, out, f32_out, x, w, y, s);
  const float alpha = 1.0f, beta = 0.0f;
  const auto& p = it->second;
  TROUPE_CUBLAS(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                               &p.algo, workspace_.as<void>(), workspace_.bytes(), s));
  return {};
}

} // namespace troupe::engine::cuda
