// Mixture-of-experts on the device, with no host round trip (so a step stays capturable in a CUDA
// graph): top-k softmax routing, a stable permutation of the (token, expert) pairs by expert,
// grouped expert GEMMs over every active expert in one launch each (gate/up, down), and the
// weighted un-permutation back to token rows. Internal to engine/backend/cuda; the GPU tests call
// moe_forward against the CPU reference.
#pragma once

#include "engine/backend/cuda/cuda_common.cuh"

namespace troupe::engine::cuda {

struct moe_dims {
  int T = 0;                  // tokens
  int H = 0;                  // hidden size
  int I = 0;                  // expert intermediate size
  int E = 0;                  // experts in the model (router width)
  int K = 0;                  // experts per token
  int expert_begin = 0;       // this rank's experts [expert_begin, expert_end)
  int expert_end = 0;         //
  bool norm_topk_prob = true; // renormalise the top-k probabilities to sum to 1
  int local() const { return expert_end - expert_begin; }
  int pairs() const { return T * K; }
};

// The largest number of local experts moe_forward handles (the permutation's shared memory).
constexpr int moe_max_local_experts = 512;
// The largest top-k.
constexpr int moe_max_topk = 32;

// Device scratch for moe_forward, sized by moe_workspace_bytes for at most max_tokens tokens.
struct moe_workspace {
  int32_t* topk_ids = nullptr;  // [T, K]
  float* topk_w = nullptr;      // [T, K]
  int32_t* slot = nullptr;      // [T, K]: the pair's row in the permuted buffers, -1 if not local
  int32_t* row_token = nullptr; // [T K]: the token of each permuted row
  int32_t* offsets = nullptr;   // [local + 1]: first permuted row of each local expert
  int32_t* active = nullptr;    // [1 + local]: count, then the local experts with rows
  int32_t* tiles = nullptr;     // [1 + 2 max_tiles]: count, then (local expert, first row)
  bf16* gate_up = nullptr;      // [T K, 2 I]
  bf16* act = nullptr;          // [T K, I]
  float* down = nullptr;        // [T K, H]
};
size_t moe_workspace_bytes(const moe_dims& d, int max_tokens);
// Carves `base` (moe_workspace_bytes, 256-byte aligned) into the buffers.
moe_workspace moe_carve(void* base, const moe_dims& d, int max_tokens);

// Rejects shapes the kernels cannot run, with the reason.
expected<void> moe_supported(const moe_dims& d);

// Which grouped GEMM runs the experts: the bandwidth-bound CUDA-core kernel (one warp per weight
// row, streaming only the active experts' rows) or the tensor-core tiles. auto_path picks the
// skinny one while the pairs average at most moe_skinny_rows per local expert.
enum class moe_path : uint8_t { auto_path, skinny, tensor_core };
constexpr int moe_skinny_rows = 4;

// out[T, H] = sum over each token's top-k local experts e of w(t, e) * down_e(silu(gate_e x) * up_e
// x), x = h[t]. router_logits [T, E] fp32; gate_up [local, 2 I, H] (gate rows, then up rows);
// down [local, H, I]. Writes out_f32 when non-null (tensor-parallel partial sums), else out_bf16.
expected<void> moe_forward(const moe_dims& d, const float* router_logits, const bf16* h,
                           const bf16* gate_up, const bf16* down, const moe_workspace& ws,
                           float* out_f32, bf16* out_bf16, moe_path path, cudaStream_t s);

} // namespace troupe::engine::cuda
