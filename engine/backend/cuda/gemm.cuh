// y[T, out] = x[T, in] · w[out, in]^T in bf16 with fp32 accumulation: a bandwidth-bound kernel of
// our own for few tokens (decode), cuBLASLt otherwise. One runner per backend (owns the handle and
// workspace); enqueues on the caller's stream; not thread-safe.
#pragma once

#include <map>
#include <tuple>

#include "engine/backend/cuda/cuda_common.cuh"

namespace troupe::engine::cuda {

// The size that n rows are treated as where shapes should repeat (vLLM's capture sizes): 1, 2,
// 4, then multiples of 8 up to 256 and of 32 beyond. Decode steps are padded to it (one CUDA
// graph per bucket), and cuBLASLt is timed once per bucket.
inline int size_bucket(int n) {
  return n <= 2 ? n : n <= 4 ? 4 : n <= 256 ? (n + 7) / 8 * 8 : (n + 31) / 32 * 32;
}

class gemm_runner {
 public:
  gemm_runner() = default;
  ~gemm_runner();
  gemm_runner(const gemm_runner&) = delete;
  gemm_runner& operator=(const gemm_runner&) = delete;

  expected<void> init(size_t workspace_bytes = 32u << 20);
  expected<void> run(const bf16* x, int T, int in, const bf16* w, int out, bf16* y, cudaStream_t s);
  expected<void> run(const bf16* x, int T, int in, const bf16* w, int out, float* y,
                     cudaStream_t s);

  // The skinny kernel handles up to skinny_max_tokens; run() uses it up to skinny_auto_tokens,
  // where it beats cuBLASLt (H100, Qwen3 shapes: at T = 8 cuBLASLt was 2.4x faster). Fusing
  // silu·mul into the down projection's input was tried and lost: every warp recomputed the
  // whole activation row (8B batch 1: 6.5 -> 7.7 ms/step). Fusing it into the gate/up
  // projection's epilogue instead (one warp per output streaming gate row j and up row I + j)
  // was neutral (H100, 2026-12-06, batch 1 ctx 512: 8B 6.208 vs 6.176 ms, 0.6B 1.351 vs
  // 1.367 ms) and was dropped; so were an L2 prefetch of each block's weight rows before
  // griddepcontrol.wait (+0.21 ms on 8B) and the combine fused into the decode kernel (+0.4 ms).
  // Later (bench/RESULTS.md, session 14): persistent per-layer kernels with grid barriers (8B
  // 6.79 vs 6.16 ms), the RMSNorms folded into the batch-1 projections (within 1%) and 8 loads
  // in flight per lane (no change) were measured and dropped too.
  static constexpr int skinny_max_tokens = 8;
  static constexpr int skinny_auto_tokens = 1;
  bool use_skinny = true; // benchmarks compare both paths
  // cuBLASLt plans for up to autotune_max_tokens rows time the heuristic's first
  // autotune_candidates algorithms once per size_bucket of rows, and only while
  // time_new_shapes is set (the backend sets it for decode steps, whose padded shapes repeat
  // every step: timing stalls the stream for milliseconds, which a mixed prefill step of a
  // one-off token count would pay under load); other row counts in the bucket reuse the fastest
  // where cuBLASLt accepts it for their shape, else keep the heuristic's first, as larger
  // (prefill) shapes do. Off: TROUPE_GEMM_AUTOTUNE=0 (benchmarks compare).
  bool autotune = true;
  bool time_new_shapes = true;
  static constexpr int autotune_candidates = 8;
  static constexpr int autotune_max_tokens = 512;

 private:
  expected<void> run_lt(const bf16* x, int T, int in, const bf16* w, int out, void* y, bool f32_out,
                        cudaStream_t s);
  struct plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    // Until settled (autotune): the heuristic's first num_candidates algorithms.
    cublasLtMatmulHeuristicResult_t candidates[autotune_candidates]{};
    int num_candidates = 0;
  };
  // Gives an autotuned plan its bucket's algorithm, timing the candidates if the bucket has
  // none and time_new_shapes allows.
  void settle(plan& p, int T, int in, int out, bool f32_out, const bf16* x, const bf16* w, void* y,
              cudaStream_t s);
  // The fastest of the candidates on these operands; the first one when timing is impossible.
  cublasLtMatmulAlgo_t fastest(const plan& p, const cublasLtMatmulHeuristicResult_t* results,
                               int found, const bf16* x, const bf16* w, void* y, cudaStream_t s);
  cublasLtHandle_t handle_ = nullptr;
  device_buffer workspace_;
  std::map<std::tuple<int, int, int, bool>, plan> plans_; // by rows, in, out, f32 output
  std::map<std::tuple<int, int, int, bool>, cublasLtMatmulAlgo_t> tuned_; // by size_bucket(rows)
};

// The skinny kernel alone, for tests: requires T <= 8 and in % 8 == 0.
expected<void> skinny_gemm(const bf16* x, int T, int in, const bf16* w, int out, void* y,
                           bool f32_out, cudaStream_t s);

} // namespace troupe::engine::cuda
