#include "engine/backend/cuda/cuda_backend_impl.cuh"

#include <algorithm>
#include <cmath>

#include "engine/model/rope.hpp"
#include "engine/model/dtype.hpp"

#include <bit>
#include <numeric>

namespace troupe::engine {

std::string cuda_unavailable_reason() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess)
    return cuda::strf("no usable CUDA device: %s", cudaGetErrorString(e));
  if (n == 0)
    return "no CUDA device";
  return {};
}

} // namespace troupe::engine

namespace troupe::engine::cuda {

template <class T>
expected<T*> cuda_backend_impl::alloc(size_t count) {
  device_buffer b;
  TROUPE_TRY_VOID(b.allocate(std::max<size_t>(count, 1) * sizeof(T)));
  T* p = b.as<T>();
  weight_bytes_ += b.bytes();
  weights_.push_back(std::move(b));
  return p;
}

void cuda_backend_impl::drop_graphs() {
  for (auto& [n, g] : graphs_)
    cudaGraphExecDestroy(g);
  graphs_.clear();
}

cuda_backend_impl::~cuda_backend_impl() {
  drop_graphs();
  if (meta_host_ != nullptr)
    cudaFreeHost(meta_host_);
  if (stream_ != nullptr)
    cudaStreamDestroy(stream_);
}

expected<bf16*> cuda_backend_impl::matrix(const weight_source* w,
                                          const std::vector<std::string>& names,
                                          const std::vector<int64_t>& rows, int64_t cols,
                                          float scale) {
  const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  auto dst = alloc<bf16>(static_cast<size_t>(total * cols));
  if (!dst)
    return dst;
  if (opt_.random_weights) {
    TROUPE_TRY_VOID(fill_random(*dst, static_cast<size_t>(total * cols), scale, opt_.seed++, stream_));
    return dst;
  }
  int64_t row0 = 0;
  std::vector<uint16_t> host;
  for (size_t i = 0; i < names.size(); ++i) {
    auto f = w->load_f32(names[i], {rows[i], cols});
    if (!f)
      return std::move(f).error();
    host.resize(f->size());
    for (size_t k = 0; k < f->size(); ++k)
      host[k] = static_cast<uint16_t>(std::bit_cast<uint32_t>(round_to_bf16((*f)[k])) >> 16);
    TROUPE_CUDA(cudaMemcpy(*dst + row0 * cols, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    row0 += rows[i];
  }
  return dst;
}

expected<float*> cuda_backend_impl::vector_f32(const weight_source* w, const std::string& name,
                                               int64_t n) {
  auto dst = alloc<float>(static_cast<size_t>(n));
  if (!dst)
    return dst;
  if (opt_.random_weights) {
    TROUPE_TRY_VOID(fill_value(*dst, static_cast<size_t>(n), 1.0f, stream_));
    return dst;
  }
  auto f = w->load_f32(name, {n});
  if (!f)
    return std::move(f).error();
  TROUPE_CUDA(cudaMemcpy(*dst, f->data(), f->size() * 4, cudaMemcpyHostToDevice));
  return dst;
}

expected<bf16*> cuda_backend_impl::vector_bf16(const weight_source* w,
                                               const std::vector<std::string>& names,
                                               const std::vector<int64_t>& sizes) {
  // A bias is a one-column matrix of its rows.
  std::vector<std::string> n = names;
  if (opt_.random_weights)
    return matrix(w, n, sizes, 1, 0.02f);
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  auto dst = alloc<bf16>(static_cast<size_t>(total));
  if (!dst)
    return dst;
  int64_t off = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    auto f = w->load_f32(names[i], {sizes[i]});
    if (!f)
      return std::move(f).error();
    std::vector<uint16_t> host(f->size());
    for (size_t k = 0; k < f->size(); ++k)
      host[k] = static_cast<uint16_t>(std::bit_cast<uint32_t>(round_to_bf16((*f)[k])) >> 16);
    TROUPE_CUDA(cudaMemcpy(*dst + off, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    off += sizes[i];
  }
  return dst;
}


expected<void> cuda_backend_impl::load_weights(const weight_source* w) {
  const auto& c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim;
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(H));
  TROUPE_ASSIGN(embed_, matrix(w, {"model.embed_tokens.weight"}, {c.vocab_size}, H, 1.0f));
  lm_head_ = embed_;
  if (!c.tie_word_embeddings)
    TROUPE_ASSIGN(lm_head_, matrix(w, {"lm_head.weight"}, {c.vocab_size}, H, in_scale));
  TROUPE_ASSIGN(final_norm_, vector_f32(w, "model.norm.weight", H));
  layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    auto& L = layers_[static_cast<size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    TROUPE_ASSIGN(L.in_norm, vector_f32(w, p + "input_layernorm.weight", H));
    TROUPE_ASSIGN(L.post_norm, vector_f32(w, p + "post_attention_layernorm.weight", H));
    TROUPE_ASSIGN(L.qkv, matrix(w, {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                    p + "self_attn.v_proj.weight"},
                                {c.q_size(), c.kv_size(), c.kv_size()}, H, in_scale));
    TROUPE_ASSIGN(L.o, matrix(w, {p + "self_attn.o_proj.weight"}, {H}, c.q_size(),
                              1.0f / std::sqrt(static_cast<float>(c.q_size()))));
    if (c.attention_bias)
      TROUPE_ASSIGN(L.qkv_bias, vector_bf16(w, {p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias",
                                                p + "self_attn.v_proj.bias"},
                                            {c.q_size(), c.kv_size(), c.kv_size()}));
    if (c.o_proj_bias)
      TROUPE_ASSIGN(L.o_bias, vector_bf16(w, {p + "self_attn.o_proj.bias"}, {H}));
    if (c.qk_norm) {
      TROUPE_ASSIGN(L.q_norm, vector_f32(w, p + "self_attn.q_norm.weight", D));
      TROUPE_ASSIGN(L.k_norm, vector_f32(w, p + "self_attn.k_norm.weight", D));
    }
    if (c.is_moe_layer(l)) {
      const int64_t I = c.moe_intermediate_size;
      TROUPE_ASSIGN(L.router, matrix(w, {p + "mlp.gate.weight"}, {c.num_experts}, H, in_scale));
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
        bf16* gu = nullptr;
        bf16* dn = nullptr;
        TROUPE_ASSIGN(gu, matrix(w, {ep + "gate_proj.weight", ep + "up_proj.weight"}, {I, I}, H,
                                 in_scale));
        TROUPE_ASSIGN(dn, matrix(w, {ep + "down_proj.weight"}, {H}, I,
                                 1.0f / std::sqrt(static_cast<float>(I))));
        L.expert_gate_up.push_back(gu);
        L.expert_down.push_back(dn);
      }
    } else {
      const int64_t I = c.intermediate_size;
      TROUPE_ASSIGN(L.gate_up, matrix(w, {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
                                      {I, I}, H, in_scale));
      TROUPE_ASSIGN(L.down, matrix(w, {p + "mlp.down_proj.weight"}, {H}, I,
                                   1.0f / std::sqrt(static_cast<float>(I))));
    }
  }
  return {};
}

expected<void> cuda_backend_impl::init(const model_config& c, const weight_source* w,
                                       kv_cache_options kv, cuda_options o) {
  config_ = c;
  kv_ = kv;
  opt_ = o;
  heads_ = {static_cast<int>(c.num_heads), static_cast<int>(c.num_kv_heads),
            static_cast<int>(c.head_dim)};
  if (opt_.max_model_len <= 0)
    opt_.max_model_len = static_cast<int>(c.max_position_embeddings);
  if (w == nullptr && !opt_.random_weights)
    return error{errc::invalid_argument, "CUDA backend: no weights given"};
  if (kv.block_size <= 0 || kv.num_blocks < 0)
    return error{errc::invalid_argument, "KV cache needs block_size > 0 and num_blocks >= 0"};
  TROUPE_CUDA(cudaSetDevice(opt_.device));
  TROUPE_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  TROUPE_CUDA(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, opt_.device));
  TROUPE_TRY_VOID(gemm_.init());
  auto inv = rope_inv_freq(c);
  TROUPE_ASSIGN(inv_freq_, alloc<float>(inv.size()));
  TROUPE_CUDA(cudaMemcpy(inv_freq_, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
  TROUPE_TRY_VOID(load_weights(w));
  const size_t model_bytes = weight_bytes_;

  // Activation workspace for max_num_batched_tokens rows.
  const size_t T = static_cast<size_t>(opt_.max_num_batched_tokens);
  const size_t R = static_cast<size_t>(opt_.max_logit_rows);
  const size_t H = static_cast<size_t>(c.hidden_size);
  size_t I = static_cast<size_t>(std::max(c.intermediate_size, c.moe_intermediate_size));
  partial_floats_ = std::max(attention_partial_floats(static_cast<int>(T), heads_, 2),
                             attention_partial_floats(opt_.max_num_seqs, heads_, 64));
  struct slice { void** ptr; size_t bytes; };
  std::vector<slice> slices = {
    {reinterpret_cast<void**>(&resid_), T * H * 4},
    {reinterpret_cast<void**>(&h_), T * H * 2},
    {reinterpret_cast<void**>(&qkv_), T * heads_.qkv_width() * 2},
    {reinterpret_cast<void**>(&attn_), T * c.q_size() * 2},
    {reinterpret_cast<void**>(&proj_), T * H * 2},
    {reinterpret_cast<void**>(&mlp_), T * 2 * I * 2},
    {reinterpret_cast<void**>(&act_), T * I * 2},
    {reinterpret_cast<void**>(&sel_), R * H * 2},
    {reinterpret_cast<void**>(&logits_), R * c.vocab_size * 4},
    {reinterpret_cast<void**>(&argmax_), R * 4},
    {reinterpret_cast<void**>(&partial_), partial_floats_ * 4},
  };
  if (c.num_experts > 0) {
    slices.push_back({reinterpret_cast<void**>(&moe_acc_), T * H * 4});
    slices.push_back({reinterpret_cast<void**>(&moe_out_), T * H * 4});
    slices.push_back({reinterpret_cast<void**>(&moe_in_), T * H * 2});
    slices.push_back({reinterpret_cast<void**>(&router_), T * c.num_experts * 4});
    slices.push_back({reinterpret_cast<void**>(&moe_rows_), T * c.num_experts_per_tok * 4});
    slices.push_back({reinterpret_cast<void**>(&moe_w_), T * c.num_experts_per_tok * 4});
  }
  size_t total = 0;
  for (auto& s : slices)
    total += (s.bytes + 255) / 256 * 256;
  TROUPE_TRY_VOID(work_.allocate(total));
  size_t off = 0;
  for (auto& s : slices) {
    *s.ptr = work_.as<char>() + off;
    off += (s.bytes + 255) / 256 * 256;
  }

  // Step metadata: tokens, positions, token_seq, slots [T]; logit rows [R]; attention routing
  // [7 T]; block tables.
  max_blocks_ = (opt_.max_model_len + kv.block_size - 1) / kv.block_size;
  meta_ints_ = 11 * T + R + static_cast<size_t>(opt_.max_num_seqs) * max_blocks_;
  TROUPE_CUDA(cudaMallocHost(&meta_host_, meta_ints_ * 4));
  TROUPE_TRY_VOID(meta_dev_.allocate(meta_ints_ * 4));

  // KV cache: the rest of the memory budget unless the caller fixed the block count.
  const size_t block_bytes = static_cast<size_t>(c.num_layers) * 2 * kv.block_size * c.kv_size() * 2;
  if (kv_.num_blocks == 0) {
    size_t free = 0, capacity = 0;
    TROUPE_CUDA(cudaMemGetInfo(&free, &capacity));
    const double budget = capacity * static_cast<double>(opt_.gpu_memory_utilization)
                          - static_cast<double>(capacity - free);
    if (budget < static_cast<double>(block_bytes))
      return error{errc::resource_exhausted,
                   strf("GPU out of memory: weights %.2f GiB, workspace %.2f GiB; "
                        "gpu_memory_utilization %.2f of %.2f GiB leaves %.2f GiB, less than one "
                        "KV block (%zu bytes)",
                        model_bytes / 1073741824.0, total / 1073741824.0,
                        static_cast<double>(opt_.gpu_memory_utilization),
                        capacity / 1073741824.0, budget / 1073741824.0, block_bytes)};
    kv_.num_blocks = static_cast<int32_t>(budget / static_cast<double>(block_bytes));
  }
  layer_kv_elems_ = static_cast<size_t>(kv_.num_blocks) * kv.block_size * c.kv_size();
  if (auto r = kv_buf_.allocate(layer_kv_elems_ * 2 * 2 * c.num_layers); !r)
    return std::move(r).error().context(
      strf("allocating %d KV blocks of %d tokens", kv_.num_blocks, kv.block_size));
  TROUPE_CUDA(cudaStreamSynchronize(stream_));
  return {};
}

} // namespace troupe::engine::cuda
