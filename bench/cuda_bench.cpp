// CUDA backend benchmark: measures the device's ceilings (copy bandwidth, bf16 GEMM rate), then
// decode ms/step and prefill tokens/s on random-weight models of real shapes, each reported as a
// ratio to the bound measured in the same run. Usage: cuda_bench
// [--shape qwen3-8b|qwen3-0.6b|qwen3-30b-a3b|qwen3-30b-a3b-dense]... [--batches 1,64]
// [--ctx 512,4096] [--no-prefill]
// (defaults: the two dense shapes, every batch and context, prefill).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <fmt/format.h>

#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/gemm.cuh"
#include "engine/backend/cuda/kernels.cuh"

using namespace troupe;
using namespace troupe::engine;

namespace {

model_config qwen3_shape(const std::string& name) {
  model_config c;
  c.architecture = "Qwen3ForCausalLM";
  c.kind = arch_kind::qwen3;
  c.vocab_size = 151936;
  c.head_dim = 128;
  c.qk_norm = true;
  c.rms_norm_eps = 1e-6;
  c.rope.theta = 1000000.0;
  c.max_position_embeddings = 40960;
  c.checkpoint_dtype = dtype::bf16;
  if (name == "qwen3-30b-a3b") { // MoE: 128 experts, 8 per token, every layer sparse
    c.architecture = "Qwen3MoeForCausalLM";
    c.kind = arch_kind::qwen3_moe;
    c.hidden_size = 2048, c.num_layers = 48, c.num_heads = 32, c.num_kv_heads = 4;
    c.intermediate_size = 6144, c.num_experts = 128, c.num_experts_per_tok = 8;
    c.moe_intermediate_size = 768, c.norm_topk_prob = true;
  } else if (name == "qwen3-30b-a3b-dense") { // its attention, and 8 x 768 rows as one dense MLP:
    // the bytes a batch-1 token reads, without routing
    c.hidden_size = 2048, c.num_layers = 48, c.num_heads = 32, c.num_kv_heads = 4;
    c.intermediate_size = 8 * 768;
  } else if (name == "qwen3-8b") {
    c.hidden_size = 4096, c.num_layers = 36, c.num_heads = 32, c.num_kv_heads = 8;
    c.intermediate_size = 12288;
  } else { // qwen3-0.6b
    c.hidden_size = 1024, c.num_layers = 28, c.num_heads = 16, c.num_kv_heads = 8;
    c.intermediate_size = 3072, c.tie_word_embeddings = true;
  }
  return c;
}

// Bytes of weights one decode step of `batch` tokens reads: everything but the input embedding
// table (a tied lm_head is read once, as lm_head). MoE layers read the router and the experts
// the batch touches: E (1 - (1 - K/E)^batch) of them in expectation when each token picks K
// distinct experts uniformly (random weights route close to that).
double step_weight_bytes(const model_config& c, int batch) {
  const double H = c.hidden_size;
  double layer = H * (c.q_size() + 2 * c.kv_size()) + c.q_size() * H;
  if (c.num_experts > 0) {
    const double E = c.num_experts, K = c.num_experts_per_tok;
    const double touched = E * (1.0 - std::pow(1.0 - K / E, batch));
    layer += E * H + touched * 3 * H * c.moe_intermediate_size;
  } else {
    layer += 3 * H * c.intermediate_size;
  }
  return 2.0 * (c.num_layers * layer + c.vocab_size * H);
}

// Weights a prefill token multiplies with (FLOPs = 2 x this per token): the K experts it is
// routed to, not all of them.
double token_weight_params(const model_config& c) {
  const double H = c.hidden_size;
  double layer = H * (c.q_size() + 2 * c.kv_size()) + c.q_size() * H;
  if (c.num_experts > 0)
    layer += c.num_experts * H + c.num_experts_per_tok * 3 * H * c.moe_intermediate_size;
  else
    layer += 3 * H * c.intermediate_size;
  return c.num_layers * layer + c.vocab_size * H;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double copy_bandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  cudaMemset(a, 1, bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < 3; ++i)
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
  std::vector<float> t;
  for (int i = 0; i < 10; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (t[t.size() / 2] * 1e-3); // bytes read + written per second
}

double gemm_tflops(int n) {
  cuda::gemm_runner g;
  if (!g.init())
    return 0;
  cuda::bf16 *x = nullptr, *w = nullptr, *y = nullptr;
  cudaMalloc(&x, size_t{2} * n * n);
  cudaMalloc(&w, size_t{2} * n * n);
  cudaMalloc(&y, size_t{2} * n * n);
  (void)cuda::fill_random(x, size_t{1} * n * n, 1.0f, 1, nullptr);
  (void)cuda::fill_random(w, size_t{1} * n * n, 1.0f, 2, nullptr);
  for (int i = 0; i < 3; ++i)
    (void)g.run(x, n, n, w, n, y, nullptr);
  cudaDeviceSynchronize();
  const int reps = 20;
  double t0 = now_ms();
  for (int i = 0; i < reps; ++i)
    (void)g.run(x, n, n, w, n, y, nullptr);
  cudaDeviceSynchronize();
  double ms = (now_ms() - t0) / reps;
  cudaFree(x);
  cudaFree(w);
  cudaFree(y);
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

// Median host-clock ms of `reps` greedy steps of `plan` after `warmup` untimed ones; -1 on error.
double median_step_ms(cuda_backend& b, const step_plan& plan, int warmup, int reps) {
  std::vector<token_id> out;
  for (int i = 0; i < warmup; ++i)
    if (auto r = b.forward_greedy(plan, out); !r) {
      fmt::print("step error: {}\n", r.error().to_string());
      return -1;
    }
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    double t0 = now_ms();
    (void)b.forward_greedy(plan, out);
    t.push_back(now_ms() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One decode step for `batch` sequences at context `ctx`: median ms over timed steps.
double decode_ms(cuda_backend& b, int batch, int ctx, int reps) {
  const int bs = b.kv_options().block_size;
  const int blocks = (ctx + bs) / bs;
  step_plan plan;
  for (int s = 0; s < batch; ++s) {
    seq_step q;
    q.id = static_cast<seq_id>(s);
    q.start_pos = ctx - 1;
    q.tokens = {static_cast<token_id>(1000 + s)};
    for (int k = 0; k < blocks; ++k)
      q.block_table.push_back(s * blocks + k);
    plan.seqs.push_back(std::move(q));
  }
  return median_step_ms(b, plan, 3, reps);
}

// Prefill of one prompt of `len` tokens: median ms.
double prefill_ms(cuda_backend& b, int len, int reps) {
  const int bs = b.kv_options().block_size;
  step_plan plan;
  seq_step q;
  q.id = 1;
  for (int i = 0; i < len; ++i)
    q.tokens.push_back(static_cast<token_id>((i * 7919) % 150000));
  for (int k = 0; k < (len + bs - 1) / bs; ++k)
    q.block_table.push_back(k);
  plan.seqs.push_back(q);
  return median_step_ms(b, plan, 1, reps);
}

struct bench_plan {
  std::vector<int> batches = {1, 8, 32, 64, 128, 256};
  std::vector<int> ctxs = {512, 4096};
  bool prefill = true;
};

std::vector<int> int_list(const char* text) {
  std::vector<int> out;
  for (const char* p = text; *p != '\0';) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    if (end == p)
      break; // not a number: stop at what parsed
    out.push_back(static_cast<int>(v));
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

void bench_shape(const std::string& shape, double bw, double peak_tflops, const bench_plan& bp) {
  auto c = qwen3_shape(shape);
  const int max_len = 8192 + 16;
  // The MoE shape's weights (61 GB) leave less room: a smaller prefill workspace.
  cuda_options opt{.max_num_batched_tokens = c.num_experts > 0 ? 2048 : 8192,
                   .max_num_seqs = 256,
                   .max_logit_rows = 256,
                   .max_model_len = max_len,
                   .gpu_memory_utilization = 0.92f,
                   .random_weights = true};
  auto b = make_cuda_backend(c, nullptr, {.num_blocks = 0, .block_size = 16}, opt);
  if (!b) {
    fmt::print("{}: {}\n", shape, b.error().to_string());
    return;
  }
  auto& be = **b;
  const double kv_token = 2.0 * c.num_layers * c.kv_size() * 2; // K and V, bf16
  const int64_t kv_tokens =
      static_cast<int64_t>(be.kv_options().num_blocks) * be.kv_options().block_size;
  fmt::print("\n## {} (weights {:.2f} GB, KV pool {} tokens)\n", shape, be.weight_bytes() / 1e9,
             kv_tokens);
  fmt::print(
      "| batch | ctx | graphs ms/step | eager ms/step | roofline ms | of roofline | tok/s |\n");
  fmt::print("| --- | --- | --- | --- | --- | --- | --- |\n");
  for (int ctx : bp.ctxs) {
    for (int batch : bp.batches) {
      const int64_t need = static_cast<int64_t>(batch) * (ctx + 16);
      if (need > kv_tokens) {
        fmt::print("| {} | {} | does not fit ({} KV tokens > {}) | | | | |\n", batch, ctx, need,
                   kv_tokens);
        continue;
      }
      be.set_use_graphs(true);
      double g = decode_ms(be, batch, ctx, 30);
      be.set_use_graphs(false);
      double e = decode_ms(be, batch, ctx, 10);
      be.set_use_graphs(true);
      double lt = 0;
      // Our skinny GEMMs against cuBLASLt for the decode projections (and, for MoE, the
      // tensor-core grouped expert GEMM against the skinny one), at every batch for MoE.
      if (batch <= 8 || c.num_experts > 0) {
        be.set_use_skinny_gemm(false);
        lt = decode_ms(be, batch, ctx, 20);
        be.set_use_skinny_gemm(true);
      }
      double roof = (step_weight_bytes(c, batch) + kv_token * batch * ctx) / bw * 1e3;
      fmt::print("| {} | {} | {:.3f} | {:.3f} | {:.3f} | {:.0f}% | {:.0f} |\n", batch, ctx, g, e,
                 roof, 100 * roof / g, batch / g * 1e3);
      if (lt > 0)
        fmt::print("| {} | {} | {:.3f} with cuBLASLt{} for all GEMMs | | | {:.0f}% | |\n", batch,
                   ctx, lt, c.num_experts > 0 ? " and tensor-core expert tiles" : "",
                   100 * roof / lt);
    }
  }
  if (!bp.prefill)
    return;
  fmt::print("\n| prompt | ms | tokens/s | GEMM TFLOP/s achieved | of measured GEMM peak |\n");
  fmt::print("| --- | --- | --- | --- | --- |\n");
  for (int len : {512, 2048, 8192}) {
    if (len > opt.max_num_batched_tokens)
      continue;
    double ms = prefill_ms(be, len, 5);
    double flops = 2.0 * (token_weight_params(c) - c.vocab_size * c.hidden_size) * len;
    double attn = 4.0 * c.num_layers * c.num_heads * c.head_dim * len * (len + 1) / 2.0;
    fmt::print("| {} | {:.1f} | {:.0f} | {:.0f} (+attention {:.1f} TFLOP) | {:.0f}% |\n", len, ms,
               len / ms * 1e3, flops / (ms * 1e-3) / 1e12, attn / 1e12,
               100 * (flops + attn) / (ms * 1e-3) / 1e12 / peak_tflops);
  }
}

} // namespace

int main(int argc, char** argv) {
  auto why = cuda_unavailable_reason();
  if (!why.empty()) {
    fmt::print("cuda_bench: {}\n", why);
    return 1;
  }
  std::vector<std::string> shapes;
  int profile_batch = 0, profile_ctx = 0;
  bench_plan bp;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--shape") == 0 && i + 1 < argc)
      shapes.push_back(argv[++i]);
    else if (std::strcmp(argv[i], "--batches") == 0 && i + 1 < argc)
      bp.batches = int_list(argv[++i]);
    else if (std::strcmp(argv[i], "--ctx") == 0 && i + 1 < argc)
      bp.ctxs = int_list(argv[++i]);
    else if (std::strcmp(argv[i], "--no-prefill") == 0)
      bp.prefill = false;
    else if (std::strcmp(argv[i], "--profile-decode") == 0 && i + 2 < argc) {
      profile_batch = std::atoi(argv[++i]);
      profile_ctx = std::atoi(argv[++i]);
    }
  }
  if (profile_batch > 0) {
    // A few eager decode steps of the first shape only, for ncu: no ceilings, no graphs.
    auto c = qwen3_shape(shapes.empty() ? "qwen3-8b" : shapes.front());
    cuda_options opt{.max_num_batched_tokens = 512,
                     .max_num_seqs = 256,
                     .max_logit_rows = 256,
                     .max_model_len = 8208,
                     .gpu_memory_utilization = c.num_experts > 0 ? 0.9f : 0.4f,
                     .random_weights = true};
    auto b = make_cuda_backend(c, nullptr, {.num_blocks = 0, .block_size = 16}, opt);
    if (!b) {
      fmt::print("{}\n", b.error().to_string());
      return 1;
    }
    (*b)->set_use_graphs(false);
    fmt::print("eager decode batch {} ctx {}: {:.3f} ms/step\n", profile_batch, profile_ctx,
               decode_ms(**b, profile_batch, profile_ctx, 3));
    return 0;
  }
  if (shapes.empty())
    shapes = {"qwen3-0.6b", "qwen3-8b"};
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  double bw = copy_bandwidth();
  double peak = gemm_tflops(8192);
  fmt::print(
      "# {} ({} SMs)\ncopy bandwidth (read+write): {:.2f} TB/s; bf16 GEMM 8192^3: {:.0f} TFLOP/s\n",
      prop.name, prop.multiProcessorCount, bw / 1e12, peak);
  for (auto& s : shapes)
    bench_shape(s, bw, peak, bp);
  return 0;
}
