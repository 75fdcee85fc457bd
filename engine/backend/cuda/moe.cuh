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

// Which grouped GEMM runs the experts: the bandwidth-bound CUDA-core kernel (two weight rows per
// warp, streaming only the active experts' rows) or the tensor-core tiles. auto_path picks the
// skinny one while there are at least moe_skinny_experts_per_pair local experts per pair (H100,
// Qwen3-30B-A3B shape: the tiles won from batch 8 on, 64 pairs over 128 experts).
enum class moe_path : uint8_t { auto_path, skinny, tensor_core };
constexpr int moe_skinny_experts_per_pair = 4;

// Where the layer's output goes: the fp32 sum of this rank's experts into `partial` [T, H]
// (tensor > 1, all-reduced by the caller), or, with partial null, added to the residual stream
// `resid` [T, H], which is then RMS-normalised with `norm` [H] into `normed` [T, H] (the input of
// the next layer), as add_rms_norm.
struct moe_output {
  float* partial = nullptr;
  float* resid = nullptr;
  const float* norm = nullptr;
  float eps = 1e-6f;
  bf16* normed = nullptr;
};

// sum[t] = the sum over each token's top-k local experts e of w(t, e) * down_e(silu(gate_e x) *
// up_e x), x = h[t], into `out`. router_logits [T, E] fp32; gate_up [local, 2 I, H] (each
// expert's gate rows, then its up rows); down [local, H, I].
expected<void> moe_forward(const moe_dims& d, const float* router_logits, const bf16* h,
                           const bf16* gate_up, const bf16* down, const moe_workspace& ws,
                           const moe_output& out, moe_path path, cudaStream_t s);

} // namespace troupe::engine::cuda
