#include "engine/backend/cuda/cuda_backend_impl.cuh"
#include "engine/backend/cuda/cuda_plugin.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <thread>

#include "engine/model/dtype.hpp"
#include "engine/model/rope.hpp"
#include "engine/model/safetensors.hpp"

namespace troupe::engine::cuda {

std::string unavailable_reason() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess)
    return cuda::strf("no usable CUDA device: %s", cudaGetErrorString(e));
  if (n == 0)
    return "no CUDA device";
  return {};
}

} // namespace troupe::engine::cuda

namespace troupe::engine::cuda {

namespace {

// Whether slice p of tensor t can travel as stored bytes (else the checked f32 path names the
// problem: shape, range or type).
bool plain(const tensor_info& t, const weight_slice& p) {
  const bool typed = t.type == dtype::bf16 || t.type == dtype::f16 || t.type == dtype::f32;
  const size_t dim = p.by_cols ? 1 : 0;
  return typed && t.shape == p.shape && p.shape.size() <= 2 && dim < p.shape.size() &&
         p.begin >= 0 && p.begin <= p.end && p.end <= p.shape[dim];
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

} // namespace

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
  listener_.reset(); // before the KV memory it may read and the events it may wait for
  drop_graphs();
  for (cudaEvent_t e : layer_events_)
    if (e != nullptr)
      cudaEventDestroy(e);
  if (meta_host_ != nullptr)
    cudaFreeHost(meta_host_);
  if (stream_ != nullptr)
    cudaStreamDestroy(stream_);
}

expected<bf16*> cuda_backend_impl::matrix(const weight_source* w,
                                          const std::vector<weight_slice>& parts, float scale) {
  // The parts stacked by rows: [sum of rows, cols], every part with the same column count.
  int64_t total = 0;
  for (const auto& p : parts)
    total += p.rows();
  auto dst = alloc<bf16>(static_cast<size_t>(total * parts.front().cols()));
  if (!dst)
    return dst;
  TROUPE_TRY_VOID(matrix_into(w, parts, scale, *dst));
  return dst;
}

expected<void> cuda_backend_impl::matrix_into(const weight_source* w,
                                              const std::vector<weight_slice>& parts, float scale,
                                              bf16* dst) {
  int64_t total = 0;
  const int64_t cols = parts.front().cols();
  for (const auto& p : parts)
    total += p.rows();
  if (opt_.random_weights)
    return fill_random(dst, static_cast<size_t>(total * cols), scale, opt_.seed++, stream_);
  int64_t row0 = 0;
  for (const auto& p : parts) {
    if (p.cols() != cols)
      return error{errc::internal,
                   strf("%s: slice of %lld columns stacked on %lld", p.name.c_str(),
                        static_cast<long long>(p.cols()), static_cast<long long>(cols))};
    TROUPE_TRY_VOID(upload_slice(w, p, dst + row0 * cols));
    row0 += p.rows();
  }
  return {};
}

expected<void> cuda_backend_impl::upload_slice(const weight_source* w, const weight_slice& p,
                                               bf16* dst) {
  // A safetensors tensor of a plain float type travels as its stored bytes; anything else (GGUF,
  // other types) is decoded to floats here and converted to bf16 on the GPU.
  if (const auto* store = w->store(); store != nullptr) {
    auto found = store->lookup(p.name);
    if (found && plain(*found->second, p)) {
      const auto [file, info] = *found;
      const int64_t ld = p.shape.size() == 2 ? p.shape[1] : 1;
      upload_job j{.src = file->data(*info),
                   .type = info->type,
                   .rows = p.rows(),
                   .ld = ld,
                   .col_begin = p.by_cols ? p.begin : 0,
                   .width = p.cols(),
                   .dst = dst};
      if (!p.by_cols)
        j.src += static_cast<size_t>(p.begin * ld) * dtype_size(info->type);
      return uploader_->enqueue(std::move(j));
    }
  }
  auto f = p.by_cols ? w->load_f32_cols(p.name, p.shape, p.begin, p.end)
                     : w->load_f32_rows(p.name, p.shape, p.begin, p.end);
  if (!f)
    return std::move(f).error();
  auto owned = std::make_shared<const std::vector<float>>(std::move(*f));
  return uploader_->enqueue({.src = reinterpret_cast<const std::byte*>(owned->data()),
                             .type = dtype::f32,
                             .rows = p.rows(),
                             .ld = p.cols(),
                             .col_begin = 0,
                             .width = p.cols(),
                             .dst = dst,
                             .owner = owned});
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

expected<void> cuda_backend_impl::load_weights(const weight_source* w) {
  // Embedding rows of this rank's vocabulary slice on the first stage, lm_head rows (or the tied
  // embedding's) on the last; the final norm everywhere (a stage's last layer normalises with it).
  const auto& c = config_;
  const auto& s = shard_;
  const int64_t H = c.hidden_size;
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(H));
  const auto embed_rows = rows_of("model.embed_tokens.weight", {c.vocab_size, H}, s.vocab);
  if (s.first_stage())
    TROUPE_ASSIGN(embed_, matrix(w, {embed_rows}, 1.0f));
  if (last_stage_) {
    if (!c.tie_word_embeddings)
      TROUPE_ASSIGN(lm_head_,
                    matrix(w, {rows_of("lm_head.weight", {c.vocab_size, H}, s.vocab)}, in_scale));
    else if (s.first_stage())
      lm_head_ = embed_;
    else
      TROUPE_ASSIGN(lm_head_, matrix(w, {embed_rows}, 1.0f));
  }
  TROUPE_ASSIGN(final_norm_, vector_f32(w, "model.norm.weight", H));
  layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = s.layers.begin; l < s.layers.end; ++l)
    TROUPE_TRY_VOID(load_layer(w, l));
  return {};
}

expected<void> cuda_backend_impl::load_all_weights(const weight_source* w) {
  // Threads that gather file bytes into pinned staging (TROUPE_LOAD_THREADS overrides), two
  // 16 MiB slots each so that one copies while the other fills.
  int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 2u, 8u));
  if (const char* env = std::getenv("TROUPE_LOAD_THREADS"); env != nullptr && std::atoi(env) > 0)
    threads = std::atoi(env);
  const auto t0 = std::chrono::steady_clock::now();
  if (!opt_.random_weights)
    TROUPE_ASSIGN(uploader_, weight_uploader::create(opt_.device, threads, 2, size_t{16} << 20,
                                                     opt_.progress));
  auto loaded = load_weights(w);
  if (uploader_) {
    auto st = uploader_->finish();
    uploader_.reset();
    if (!loaded)
      return loaded;
    if (!st)
      return std::move(st).error();
    timings_.read_s = st->gather_s;
    timings_.loader_threads = st->workers;
    timings_.weight_file_bytes = st->bytes;
  }
  TROUPE_CUDA(cudaStreamSynchronize(stream_)); // random weights are filled on stream_
  timings_.weights_s = seconds_since(t0);
  return loaded;
}

expected<void> cuda_backend_impl::load_layer(const weight_source* w, int64_t l) {
  // q/k/v and gate/up by output rows (whole heads), o and down by input columns.
  const auto& c = config_;
  const auto& s = shard_;
  const int64_t H = c.hidden_size, D = c.head_dim;
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(H));
  const index_range q{s.heads.begin * D, s.heads.end * D};
  const index_range kv{s.kv_heads.begin * D, s.kv_heads.end * D};
  auto& L = layers_[static_cast<size_t>(l)];
  const std::string p = "model.layers." + std::to_string(l) + ".";
  const std::string a = p + "self_attn.";
  TROUPE_ASSIGN(L.in_norm, vector_f32(w, p + "input_layernorm.weight", H));
  TROUPE_ASSIGN(L.post_norm, vector_f32(w, p + "post_attention_layernorm.weight", H));
  TROUPE_ASSIGN(L.qkv, matrix(w,
                              {rows_of(a + "q_proj.weight", {c.q_size(), H}, q),
                               rows_of(a + "k_proj.weight", {c.kv_size(), H}, kv),
                               rows_of(a + "v_proj.weight", {c.kv_size(), H}, kv)},
                              in_scale));
  TROUPE_ASSIGN(L.o, matrix(w, {cols_of(a + "o_proj.weight", {H, c.q_size()}, q)},
                            1.0f / std::sqrt(static_cast<float>(c.q_size()))));
  if (c.attention_bias)
    TROUPE_ASSIGN(L.qkv_bias, matrix(w,
                                     {rows_of(a + "q_proj.bias", {c.q_size()}, q),
                                      rows_of(a + "k_proj.bias", {c.kv_size()}, kv),
                                      rows_of(a + "v_proj.bias", {c.kv_size()}, kv)},
                                     0.02f));
  if (c.o_proj_bias)
    TROUPE_ASSIGN(L.o_bias, matrix(w, {whole(a + "o_proj.bias", {H})}, 0.02f));
  if (c.qk_norm) {
    TROUPE_ASSIGN(L.q_norm, vector_f32(w, a + "q_norm.weight", D));
    TROUPE_ASSIGN(L.k_norm, vector_f32(w, a + "k_norm.weight", D));
  }
  if (c.is_moe_layer(l)) {
    const int64_t I = c.moe_intermediate_size;
    const float down_scale = 1.0f / std::sqrt(static_cast<float>(I));
    TROUPE_ASSIGN(L.router,
                  matrix(w, {whole(p + "mlp.gate.weight", {c.num_experts, H})}, in_scale));
    // Each weight kind of all this rank's experts in one allocation: the grouped GEMMs index
    // them by local expert. Of each expert only this rank's slice of the intermediate dimension
    // (the whole expert unless parallel.expert < tensor).
    const size_t n = static_cast<size_t>(s.experts.size());
    const size_t one = static_cast<size_t>(H * s.expert_slice.size()); // [I_local, H], [H, I_local]
    TROUPE_ASSIGN(L.experts_gate_up, alloc<bf16>(n * 2 * one));
    TROUPE_ASSIGN(L.experts_down, alloc<bf16>(n * one));
    for (int64_t e = s.experts.begin; e < s.experts.end; ++e) {
      const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
      const size_t mine = static_cast<size_t>(e - s.experts.begin);
      TROUPE_TRY_VOID(matrix_into(w,
                                  {rows_of(ep + "gate_proj.weight", {I, H}, s.expert_slice),
                                   rows_of(ep + "up_proj.weight", {I, H}, s.expert_slice)},
                                  in_scale, L.experts_gate_up + mine * 2 * one));
      TROUPE_TRY_VOID(matrix_into(w, {cols_of(ep + "down_proj.weight", {H, I}, s.expert_slice)},
                                  down_scale, L.experts_down + mine * one));
    }
  } else {
    const int64_t I = c.intermediate_size;
    TROUPE_ASSIGN(L.gate_up, matrix(w,
                                    {rows_of(p + "mlp.gate_proj.weight", {I, H}, s.intermediate),
                                     rows_of(p + "mlp.up_proj.weight", {I, H}, s.intermediate)},
                                    in_scale));
    TROUPE_ASSIGN(L.down, matrix(w, {cols_of(p + "mlp.down_proj.weight", {H, I}, s.intermediate)},
                                 1.0f / std::sqrt(static_cast<float>(I))));
  }
  return {};
}

expected<void> cuda_backend_impl::check_parallel(const cuda_options& o) {
  const auto& lay = o.layout;
  if (o.tensor == nullptr && lay.tp_size != 1)
    return error{errc::invalid_argument, "CUDA backend: tensor > 1 needs a tensor communicator"};
  if (o.tensor != nullptr && (o.tensor->size() != lay.tp_size || o.tensor->rank() != lay.tp_rank))
    return error{errc::invalid_argument,
                 strf("CUDA backend: tensor communicator is rank %d of %d, layout says %d of %d",
                      o.tensor->rank(), o.tensor->size(), lay.tp_rank, lay.tp_size)};
  if (lay.pp_size > 1 && (o.world == nullptr || o.world->size() != lay.world_size() ||
                          o.world->rank() != lay.world_rank()))
    return error{errc::invalid_argument,
                 strf("CUDA backend: pipeline=%d needs a world communicator of %d ranks with "
                      "this rank at %d",
                      lay.pp_size, lay.world_size(), lay.world_rank())};
  comm_capturable_ = (o.tensor == nullptr || o.tensor->capturable()) &&
                     (lay.pp_size == 1 || o.world->capturable());
  return {};
}

expected<size_t> cuda_backend_impl::alloc_workspace() {
  // Activations for max_num_batched_tokens rows with this rank's head and intermediate widths.
  const auto& c = config_;
  const size_t T = static_cast<size_t>(opt_.max_num_batched_tokens);
  const size_t R = static_cast<size_t>(opt_.max_logit_rows);
  const size_t H = static_cast<size_t>(c.hidden_size);
  const size_t I =
      static_cast<size_t>(std::max<int64_t>(shard_.intermediate.size(), c.moe_intermediate_size));
  const size_t q_local = static_cast<size_t>(heads_.num_heads) * heads_.head_dim;
  partial_floats_ = std::max(attention_partial_floats(static_cast<int>(T), heads_, 2),
                             attention_partial_floats(opt_.max_num_seqs, heads_, 64));
  struct slice {
    void** ptr;
    size_t bytes;
  };
  std::vector<slice> slices = {
      {reinterpret_cast<void**>(&resid_), T * H * 4},
      {reinterpret_cast<void**>(&h_), T * H * 2},
      {reinterpret_cast<void**>(&qkv_), T * heads_.qkv_width() * 2},
      {reinterpret_cast<void**>(&attn_), T * q_local * 2},
      {reinterpret_cast<void**>(&proj_), T * H * 2},
      {reinterpret_cast<void**>(&mlp_), T * 2 * I * 2},
      {reinterpret_cast<void**>(&act_), T * I * 2},
      {reinterpret_cast<void**>(&sel_), R * H * 2},
      {reinterpret_cast<void**>(&logits_), R * c.vocab_size * 4},
      {reinterpret_cast<void**>(&argmax_), R * 4},
      {reinterpret_cast<void**>(&partial_), partial_floats_ * 4},
  };
  if (tp_ > 1) {
    const size_t chunk = static_cast<size_t>(shard_.vocab_chunk);
    slices.push_back({reinterpret_cast<void**>(&gather_in_), R * chunk * 4});
    slices.push_back({reinterpret_cast<void**>(&gather_out_), tp_ * R * chunk * 4});
  }
  void* moe_base = nullptr;
  if (c.num_experts > 0) {
    if (tp_ > 1)
      slices.push_back({reinterpret_cast<void**>(&moe_acc_), T * H * 4});
    slices.push_back({reinterpret_cast<void**>(&router_), T * c.num_experts * 4});
    slices.push_back({&moe_base, moe_workspace_bytes(moe_dims_, static_cast<int>(T))});
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
  if (moe_base != nullptr)
    moe_ws_ = moe_carve(moe_base, moe_dims_, static_cast<int>(T));
  return total;
}

expected<void> cuda_backend_impl::alloc_kv(size_t workspace_bytes) {
  // This stage's layers and this rank's kv heads; the rest of the memory budget unless the
  // caller fixed the block count.
  const size_t kv_local = static_cast<size_t>(heads_.num_kv_heads) * heads_.head_dim;
  const size_t layers = static_cast<size_t>(shard_.layers.size());
  const size_t block_bytes = layers * 2 * kv_.block_size * kv_local * 2;
  if (kv_.num_blocks == 0) {
    size_t free = 0, capacity = 0;
    TROUPE_CUDA(cudaMemGetInfo(&free, &capacity));
    const double budget = capacity * static_cast<double>(opt_.gpu_memory_utilization) -
                          static_cast<double>(capacity - free);
    if (budget < static_cast<double>(block_bytes))
      return error{errc::resource_exhausted,
                   strf("GPU out of memory: weights %.2f GiB, workspace %.2f GiB; "
                        "gpu_memory_utilization %.2f of %.2f GiB leaves %.2f GiB, less than one "
                        "KV block (%zu bytes)",
                        weight_bytes_ / 1073741824.0, workspace_bytes / 1073741824.0,
                        static_cast<double>(opt_.gpu_memory_utilization), capacity / 1073741824.0,
                        budget / 1073741824.0, block_bytes)};
    kv_.num_blocks = static_cast<int32_t>(budget / static_cast<double>(block_bytes));
  }
  layer_kv_elems_ = static_cast<size_t>(kv_.num_blocks) * kv_.block_size * kv_local;
  if (auto r = kv_buf_.allocate(layer_kv_elems_ * 2 * 2 * layers); !r)
    return std::move(r).error().context(
        strf("allocating %d KV blocks of %d tokens", kv_.num_blocks, kv_.block_size));
  // Zeros, so that what warm-up and padding rows read before any sequence wrote there is finite.
  TROUPE_CUDA(cudaMemsetAsync(kv_buf_.as<char>(), 0, kv_buf_.bytes(), stream_));
  return {};
}

kv_layout cuda_backend_impl::kv_memory() const {
  auto k =
      shard_kv_layout(config_, shard_, kv_.block_size, kv_.num_blocks, "bfloat16", sizeof(bf16));
  k.allocations = {{kv_buf_.as<bf16>(), kv_buf_.bytes(), true}};
  const uint64_t plane = layer_kv_elems_ * sizeof(bf16); // K then V, layer after layer
  for (int64_t l = 0; l < shard_.layers.size(); ++l) {
    k.planes.push_back({0, static_cast<uint64_t>(2 * l) * plane});
    k.planes.push_back({0, static_cast<uint64_t>(2 * l + 1) * plane});
  }
  return k;
}

bf16* cuda_backend_impl::k_cache(int l) const {
  return kv_buf_.as<bf16>() + static_cast<size_t>(2 * (l - shard_.layers.begin)) * layer_kv_elems_;
}

expected<void> cuda_backend_impl::init(const model_config& c, const weight_source* w,
                                       kv_cache_options kv, cuda_options o) {
  config_ = c;
  kv_ = kv;
  opt_ = o;
  auto shard = plan_shard(c, o.layout);
  if (!shard)
    return std::move(shard).error();
  shard_ = *shard;
  last_stage_ = shard_.layers.end == c.num_layers;
  tp_ = o.layout.tp_size;
  TROUPE_TRY_VOID(check_parallel(o));
  heads_ = {static_cast<int>(shard_.heads.size()), static_cast<int>(shard_.kv_heads.size()),
            static_cast<int>(c.head_dim)};
  if (opt_.max_model_len <= 0)
    opt_.max_model_len = static_cast<int>(c.max_position_embeddings);
  if (w == nullptr && !opt_.random_weights)
    return error{errc::invalid_argument, "CUDA backend: no weights given"};
  if (kv.block_size <= 0 || kv.num_blocks < 0)
    return error{errc::invalid_argument, "KV cache needs block_size > 0 and num_blocks >= 0"};
  if (c.num_experts > 0) {
    moe_dims_ = {.H = static_cast<int>(c.hidden_size),
                 .I = static_cast<int>(shard_.expert_slice.size()),
                 .E = static_cast<int>(c.num_experts),
                 .K = static_cast<int>(c.num_experts_per_tok),
                 .expert_begin = static_cast<int>(shard_.experts.begin),
                 .expert_end = static_cast<int>(shard_.experts.end),
                 .norm_topk_prob = c.norm_topk_prob};
    TROUPE_TRY_VOID(moe_supported(moe_dims_));
  }
  TROUPE_CUDA(cudaSetDevice(opt_.device));
  TROUPE_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  TROUPE_CUDA(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, opt_.device));
  TROUPE_TRY_VOID(gemm_.init());
  auto inv = rope_inv_freq(c);
  TROUPE_ASSIGN(inv_freq_, alloc<float>(inv.size()));
  TROUPE_CUDA(cudaMemcpy(inv_freq_, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
  // Memory plan: weights, then the activation workspace, then the KV pool from what
  // gpu_memory_utilization leaves (alloc_kv). Running out names the numbers.
  auto with_numbers = [&](error e, const char* what) -> error {
    size_t free = 0, capacity = 0;
    cudaMemGetInfo(&free, &capacity);
    return std::move(e).context(
        strf("%s: weights so far %.2f GiB, GPU %d has %.2f GiB free of %.2f GiB "
             "(gpu_memory_utilization %.2f)",
             what, weight_bytes_ / 1073741824.0, opt_.device, free / 1073741824.0,
             capacity / 1073741824.0, static_cast<double>(opt_.gpu_memory_utilization)));
  };
  if (auto r = load_all_weights(w); !r)
    return with_numbers(std::move(r).error(), "loading the weights");
  size_t workspace = 0;
  auto t0 = std::chrono::steady_clock::now();
  if (auto r = alloc_workspace(); !r)
    return with_numbers(std::move(r).error(), "allocating the activation workspace");
  else
    workspace = *r;
  timings_.workspace_s = seconds_since(t0);

  // Step metadata: tokens, positions, token_seq, slots [T]; logit rows [R]; attention routing
  // [7 T]; block tables.
  const size_t T = static_cast<size_t>(opt_.max_num_batched_tokens);
  const size_t R = static_cast<size_t>(opt_.max_logit_rows);
  max_blocks_ = (opt_.max_model_len + kv.block_size - 1) / kv.block_size;
  meta_ints_ = 11 * T + R + static_cast<size_t>(opt_.max_num_seqs) * max_blocks_;
  TROUPE_CUDA(cudaMallocHost(&meta_host_, meta_ints_ * 4));
  TROUPE_TRY_VOID(meta_dev_.allocate(meta_ints_ * 4));
  t0 = std::chrono::steady_clock::now();
  TROUPE_TRY_VOID(alloc_kv(workspace));
  TROUPE_CUDA(cudaStreamSynchronize(stream_));
  timings_.kv_s = seconds_since(t0);
  return {};
}

} // namespace troupe::engine::cuda
