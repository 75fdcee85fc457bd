// Running steps on the CUDA backend: metadata upload, the layer sequence (with the tensor group's
// all-reduces and the pipeline's send/recv), CUDA graphs for decode steps, and the
// two ways results come back (logits, or greedy ids). MoE layers run on the device (moe.cu).
#include <algorithm>
#include <optional>

#include "engine/backend/cuda/cuda_backend_impl.cuh"
#include "engine/backend/cuda/cuda_plugin.hpp"

namespace troupe::engine::cuda {

namespace {

// Lays the step's metadata out back to back: [T] x4, [R], flash tiles [T, 3], split tokens [T],
// decode tiles [T, 3], [S, mb].
step_meta layout(int32_t* base, int T, int R) {
  step_meta m;
  m.tokens = base;
  m.positions = base + T;
  m.token_seq = base + 2 * T;
  m.slots = base + 3 * T;
  m.logit_src = base + 4 * T;
  m.flash_tiles = base + 4 * T + R;
  m.split_tokens = base + 7 * T + R;
  m.decode_tiles = base + 8 * T + R;
  m.block_tables = base + 11 * T + R;
  return m;
}

// Sequences with at least this many query tokens use the tensor-core prefill kernel.
constexpr int flash_min_tokens = 8;

// The batch size a decode step of n sequences runs at (padded up to it): its size_bucket, so
// that few sizes, each captured once, serve every step; never above `cap`.
int decode_bucket(int n, int cap) {
  return std::max(n, std::min(size_bucket(n), cap));
}

} // namespace

void cuda_backend_impl::choose_split(int max_ctx) {
  // Enough blocks to fill the GPU twice over, shares of at least 64 keys, within the buffer.
  const int per_split = T_ * heads_.num_kv_heads;
  int splits = std::max(1, (2 * sm_count_ + per_split - 1) / per_split);
  splits = std::min({splits, std::max(1, (max_ctx + 63) / 64), 512});
  const size_t one = attention_partial_floats(T_, heads_, 1);
  splits = std::max(1, std::min<int>(splits, static_cast<int>(partial_floats_ / one)));
  splits_ = splits;
}

expected<void> cuda_backend_impl::upload(const step_plan& plan) {
  TROUPE_TRY_VOID(validate_plan(plan, config_, kv_));
  T_ = plan.num_tokens();
  S_ = static_cast<int>(plan.seqs.size());
  R_ = 0;
  graph_step_ = true; // decode-shaped so far
  int max_ctx = 1;
  size_t widest = 0;
  for (const auto& s : plan.seqs) {
    const int n = static_cast<int>(s.tokens.size());
    R_ += s.logits == logits_mode::none ? 0 : s.logits == logits_mode::last ? 1 : n;
    graph_step_ = graph_step_ && n == 1 && s.logits == logits_mode::last;
    max_ctx = std::max(max_ctx, s.start_pos + n);
    widest = std::max(widest, s.block_table.size());
  }
  if (T_ > opt_.max_num_batched_tokens || S_ > opt_.max_num_seqs || R_ > opt_.max_logit_rows)
    return error{errc::resource_exhausted,
                 strf("step %llu: %d tokens, %d sequences, %d logits rows exceed the CUDA "
                      "backend's limits (%d, %d, %d)",
                      static_cast<unsigned long long>(plan.step), T_, S_, R_,
                      opt_.max_num_batched_tokens, opt_.max_num_seqs, opt_.max_logit_rows)};
  if (max_ctx > opt_.max_model_len)
    return error{errc::out_of_range,
                 strf("step %llu: context of %d tokens exceeds max_model_len %d",
                      static_cast<unsigned long long>(plan.step), max_ctx, opt_.max_model_len)};
  // Decode steps use fixed shapes (every table max_blocks_ wide, split for max_model_len, the
  // batch padded to its bucket) so that one captured graph per bucket serves every such step,
  // and eager runs of them (graphs off) compute exactly the same sums.
  pad_ = 0;
  if (graph_step_ && S_ > 0) {
    pad_ = decode_bucket(S_, max_decode_batch()) - S_;
  }
  const int real_T = T_;
  T_ += pad_;
  S_ += pad_;
  R_ += pad_;
  mb_ = graph_step_ ? max_blocks_ : static_cast<int>(std::max<size_t>(widest, 1));
  choose_split(graph_step_ ? opt_.max_model_len : max_ctx);
  host_ = layout(meta_host_, T_, R_);
  dev_ = layout(meta_dev_.as<int32_t>(), T_, R_);
  int t = 0, r = 0;
  for (int i = 0; i < S_ - pad_; ++i) {
    const auto& s = plan.seqs[static_cast<size_t>(i)];
    const int n = static_cast<int>(s.tokens.size());
    for (int j = 0; j < n; ++j, ++t) {
      const int pos = s.start_pos + j;
      host_.tokens[t] = s.tokens[static_cast<size_t>(j)];
      host_.positions[t] = pos;
      host_.token_seq[t] = i;
      host_.slots[t] = s.block_table[static_cast<size_t>(pos / kv_.block_size)] * kv_.block_size +
                       pos % kv_.block_size;
      if (s.logits == logits_mode::all || (s.logits == logits_mode::last && j == n - 1))
        host_.logit_src[r++] = t;
    }
    std::copy(s.block_table.begin(), s.block_table.end(),
              host_.block_tables + static_cast<size_t>(i) * mb_);
  }
  // Padding rows repeat the last sequence's token, position and block table (so attention reads
  // what it reads) but write no cache entry (slot -1), and their logits rows go unread.
  for (int i = S_ - pad_; i < S_; ++i, ++t) {
    host_.tokens[t] = host_.tokens[real_T - 1];
    host_.positions[t] = host_.positions[real_T - 1];
    host_.token_seq[t] = i;
    host_.slots[t] = -1;
    host_.logit_src[r++] = t;
    std::copy_n(host_.block_tables + static_cast<size_t>(S_ - pad_ - 1) * mb_, mb_,
                host_.block_tables + static_cast<size_t>(i) * mb_);
  }
  // Pure decode steps route every token the same way at a given batch size (one decode tile
  // each), so a graph captured once stays valid.
  route_ = attention_args{};
  seq_tokens_.clear();
  for (const auto& s : plan.seqs)
    seq_tokens_.push_back(static_cast<int>(s.tokens.size()));
  seq_tokens_.resize(static_cast<size_t>(S_), 1);
  route_attention(seq_tokens_.data(), S_, heads_, flash_min_tokens, host_.flash_tiles,
                  host_.split_tokens, host_.decode_tiles, route_);
  route_.flash_tiles = dev_.flash_tiles;
  route_.split_tokens = dev_.split_tokens;
  route_.decode_tiles = dev_.decode_tiles;
  const size_t ints = 11 * static_cast<size_t>(T_) + R_ + static_cast<size_t>(S_) * mb_;
  TROUPE_CUDA(
      cudaMemcpyAsync(dev_.tokens, host_.tokens, ints * 4, cudaMemcpyHostToDevice, stream_));
  return {};
}

expected<bool> cuda_backend_impl::warm_up_next() {
  const int cap = max_decode_batch();
  if (!use_graphs_ || tp_ != 1 || opt_.layout.pp_size != 1 || kv_.num_blocks < 1)
    return false;
  for (; warm_next_ <= cap; warm_next_ = decode_bucket(warm_next_, cap) + 1) {
    const int n = decode_bucket(warm_next_, cap);
    if (graphs_.count(n))
      continue; // met already
    // Every row at position 0 of block 0, writing no cache entry (slot -1, as padding rows do):
    // sequences may hold the block by now.
    step_plan plan;
    plan.seqs.resize(static_cast<size_t>(n));
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      auto& s = plan.seqs[i];
      s.id = static_cast<seq_id>(i);
      s.tokens = {0};
      s.num_prompt_tokens = 1;
      s.block_table = {0};
      s.logits = logits_mode::last;
    }
    TROUPE_TRY_VOID(upload(plan));
    for (int t = 0; t < T_; ++t)
      host_.slots[t] = -1;
    TROUPE_CUDA(cudaMemcpyAsync(dev_.slots, host_.slots, static_cast<size_t>(T_) * 4,
                                cudaMemcpyHostToDevice, stream_));
    TROUPE_TRY_VOID(run_step(nullptr));
    TROUPE_CUDA(cudaStreamSynchronize(stream_));
    warm_next_ = n + 1;
    return true;
  }
  return false;
}

expected<void> cuda_backend_impl::layer(int l) {
  const auto& c = config_;
  const auto& w = layers_[static_cast<size_t>(l)];
  const int H = static_cast<int>(c.hidden_size);
  const float eps = static_cast<float>(c.rms_norm_eps);
  bf16* k_cache = this->k_cache(l);
  bf16* v_cache = k_cache + layer_kv_elems_;
  const int q_local = heads_.num_heads * heads_.head_dim;
  TROUPE_TRY_VOID(gemm_.run(h_, T_, H, w.qkv, heads_.qkv_width(), qkv_, stream_));
  TROUPE_TRY_VOID(qkv_rope_cache(qkv_, w.qkv_bias, w.q_norm, w.k_norm, eps, dev_.positions,
                                 dev_.slots, inv_freq_, T_, heads_, k_cache, v_cache, stream_));
  attention_args a;
  a.qkv = qkv_;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.token_seq = dev_.token_seq;
  a.positions = dev_.positions;
  a.block_tables = dev_.block_tables;
  a.max_blocks = mb_;
  a.block_size = kv_.block_size;
  a.T = T_;
  a.num_splits = splits_;
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  a.partial = partial_;
  a.out = attn_;
  a.flash_tiles = route_.flash_tiles;
  a.num_flash_tiles = route_.num_flash_tiles;
  a.split_tokens = route_.split_tokens;
  a.num_split_tokens = route_.num_split_tokens;
  a.decode_tiles = route_.decode_tiles;
  TROUPE_TRY_VOID(paged_attention(a, heads_, stream_));
  TROUPE_TRY_VOID(gemm_.run(attn_, T_, q_local, w.o, H, proj_, stream_));
  TROUPE_TRY_VOID(tp_sum(proj_, static_cast<size_t>(T_) * H, comm::device_dtype::bf16));
  TROUPE_TRY_VOID(add_rms_norm(resid_, proj_, w.o_bias, T_, H, w.post_norm, eps, h_, stream_));
  // A stage's last layer normalises with the final norm; the next stage renormalises its input.
  const float* next =
      l + 1 < shard_.layers.end ? layers_[static_cast<size_t>(l + 1)].in_norm : final_norm_;
  if (w.router != nullptr && tp_ == 1)
    return moe(w, next); // adds to the residual stream and normalises itself
  if (w.router != nullptr) {
    TROUPE_TRY_VOID(moe(w, nullptr));
  } else {
    const int I = static_cast<int>(shard_.intermediate.size());
    TROUPE_TRY_VOID(gemm_.run(h_, T_, H, w.gate_up, 2 * I, mlp_, stream_));
    TROUPE_TRY_VOID(silu_mul(mlp_, T_, I, act_, stream_));
    TROUPE_TRY_VOID(gemm_.run(act_, T_, I, w.down, H, proj_, stream_));
    TROUPE_TRY_VOID(tp_sum(proj_, static_cast<size_t>(T_) * H, comm::device_dtype::bf16));
  }
  return add_rms_norm(resid_, proj_, nullptr, T_, H, next, eps, h_, stream_);
}

expected<void> cuda_backend_impl::moe(const gpu_layer& w, const float* next_norm) {
  // Router logits, then routing, permutation, grouped expert GEMMs and the weighted combine on
  // the device (moe.cu): nothing comes back to the host, so MoE decode steps are graph-captured.
  // At tensor = 1 the combine also adds to the residual stream and applies next_norm; at
  // tensor > 1 each rank sums its own experts (or its slices of its expert group's experts,
  // parallel.expert < tensor), the fp32 partial sums are all-reduced and proj_ holds the result.
  const int H = static_cast<int>(config_.hidden_size), E = static_cast<int>(config_.num_experts);
  TROUPE_TRY_VOID(gemm_.run(h_, T_, H, w.router, E, router_, stream_));
  moe_dims d = moe_dims_;
  d.T = T_;
  moe_output out;
  if (next_norm != nullptr) {
    out.resid = resid_;
    out.norm = next_norm;
    out.eps = static_cast<float>(config_.rms_norm_eps);
    out.normed = h_;
  } else {
    out.partial = moe_acc_;
  }
  // h_ is both the input and (fused) the output: the combine runs after every read of it.
  TROUPE_TRY_VOID(moe_forward(d, router_, h_, w.experts_gate_up, w.experts_down, moe_ws_, out,
                              moe_path_, stream_));
  if (next_norm != nullptr)
    return {};
  TROUPE_TRY_VOID(tp_sum(moe_acc_, static_cast<size_t>(T_) * H, comm::device_dtype::f32));
  return f32_to_bf16(moe_acc_, static_cast<size_t>(T_) * H, proj_, stream_);
}

expected<void> cuda_backend_impl::tp_sum(void* data, size_t count, comm::device_dtype t) {
  if (tp_ == 1)
    return {};
  return opt_.tensor->all_reduce_sum(data, count, t, stream_);
}

expected<void> cuda_backend_impl::sync() {
  // Each communicator waits (bounded) and aborts itself on a timeout, which ends its kernels; the
  // first failure is reported after the other has had its chance to unblock the stream too.
  std::optional<error> first;
  for (auto* c : {opt_.tensor, opt_.layout.pp_size > 1 ? opt_.world : nullptr}) {
    if (c == nullptr || c->size() == 1)
      continue;
    if (auto r = c->synchronize(stream_); !r && !first)
      first = std::move(r).error();
  }
  if (first)
    return std::move(*first);
  TROUPE_CUDA(cudaStreamSynchronize(stream_));
  return {};
}

expected<void> cuda_backend_impl::lm_head() {
  // Vocab-parallel: each rank its [R, vocab slice] block, all-gathered in padded chunks and
  // copied into place in logits_ [R, V].
  const int H = static_cast<int>(config_.hidden_size), V = static_cast<int>(config_.vocab_size);
  if (tp_ == 1)
    return gemm_.run(sel_, R_, H, lm_head_, V, logits_, stream_);
  if (R_ == 0)
    return {};
  const int64_t chunk = shard_.vocab_chunk;
  TROUPE_TRY_VOID(
      gemm_.run(sel_, R_, H, lm_head_, static_cast<int>(shard_.vocab.size()), gather_in_, stream_));
  const size_t n = static_cast<size_t>(R_) * static_cast<size_t>(chunk);
  TROUPE_TRY_VOID(
      opt_.tensor->all_gather(gather_in_, gather_out_, n, comm::device_dtype::f32, stream_));
  for (int k = 0; k < tp_; ++k) {
    const int64_t begin = std::min<int64_t>(V, k * chunk),
                  end = std::min<int64_t>(V, (k + 1) * chunk);
    if (end == begin)
      continue;
    const size_t w = static_cast<size_t>(end - begin) * 4;
    TROUPE_CUDA(cudaMemcpy2DAsync(logits_ + begin, static_cast<size_t>(V) * 4,
                                  gather_out_ + static_cast<size_t>(k) * n, w, w,
                                  static_cast<size_t>(R_), cudaMemcpyDeviceToDevice, stream_));
  }
  return {};
}

expected<void> cuda_backend_impl::run_model() {
  // First stage: vocab-parallel embedding (rows of other ranks' tokens are zero, the all-reduce
  // joins them); later stages receive the residual stream from the previous stage instead.
  const auto& c = config_;
  const auto& lay = opt_.layout;
  const int H = static_cast<int>(c.hidden_size);
  const size_t TH = static_cast<size_t>(T_) * H;
  const float eps = static_cast<float>(c.rms_norm_eps);
  if (shard_.first_stage()) {
    TROUPE_TRY_VOID(embed(dev_.tokens, T_, embed_, H, resid_, stream_,
                          static_cast<int>(shard_.vocab.begin),
                          static_cast<int>(shard_.vocab.size())));
    TROUPE_TRY_VOID(tp_sum(resid_, TH, comm::device_dtype::f32));
  } else {
    TROUPE_TRY_VOID(opt_.world->recv(resid_, TH, comm::device_dtype::f32,
                                     lay.world_rank() - lay.tp_size, stream_));
  }
  const int first = static_cast<int>(shard_.layers.begin);
  TROUPE_TRY_VOID(
      rms_norm(resid_, T_, H, layers_[static_cast<size_t>(first)].in_norm, eps, h_, stream_));
  for (int l = first; l < static_cast<int>(shard_.layers.end); ++l) {
    TROUPE_TRY_VOID(layer(l));
    if (listening_)
      TROUPE_TRY_VOID(layer_written(l));
  }
  if (!last_stage_)
    return opt_.world->send(resid_, TH, comm::device_dtype::f32, lay.world_rank() + lay.tp_size,
                            stream_);
  TROUPE_TRY_VOID(gather_rms_norm(resid_, dev_.logit_src, R_, H, final_norm_, eps, sel_, stream_));
  return lm_head();
}

expected<void> cuda_backend_impl::layer_written(int l) {
  const size_t i = static_cast<size_t>(l - shard_.layers.begin);
  if (layer_events_.size() <= i)
    layer_events_.resize(static_cast<size_t>(shard_.layers.size()), nullptr);
  cudaEvent_t& e = layer_events_[i];
  if (e == nullptr)
    TROUPE_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  TROUPE_CUDA(cudaEventRecord(e, stream_));
  // Waited for later, perhaps after a later step recorded it again: then for that one.
  listener_->layer_written(l, [e]() -> expected<void> {
    TROUPE_CUDA(cudaEventSynchronize(e));
    return {};
  });
  return {};
}

expected<void> cuda_backend_impl::run_step(const step_plan* plan) {
  listening_ = plan != nullptr && listener_ != nullptr && listener_->step_begins(*plan);
  auto done = launch_step();
  if (listening_)
    listener_->step_ends(done.has_value());
  listening_ = false;
  return done;
}

expected<void> cuda_backend_impl::launch_step() {
  gemm_.time_new_shapes = graph_step_; // decode shapes repeat; a mixed step's rarely do
  // A step whose layers are listened to runs eagerly: the listener hears of each as it is queued.
  if (!graph_step_ || !use_graphs_ || !comm_capturable_ || listening_)
    return run_model();
  auto it = graphs_.find(T_);
  if (it == graphs_.end()) {
    // The first step of a batch size runs eagerly (GEMM plans are made and timed outside
    // capture) and is then captured, not launched: replaying it would compute the same again.
    TROUPE_TRY_VOID(run_model());
    cudaGraph_t graph = nullptr;
    TROUPE_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    auto captured = run_model();
    cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (!captured) {
      if (graph != nullptr)
        cudaGraphDestroy(graph);
      return captured;
    }
    TROUPE_CUDA(end);
    cudaGraphExec_t exec = nullptr;
    cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    TROUPE_CUDA(inst);
    graphs_.emplace(T_, exec);
    return {};
  }
  TROUPE_CUDA(cudaGraphLaunch(it->second, stream_));
  return {};
}

expected<void> cuda_backend_impl::from_last_stage(void* data, size_t words) {
  // Every rank leaves a step with what the last stage's tensor rank 0 made (as the CPU backend).
  const auto& lay = opt_.layout;
  if (lay.pp_size == 1 || words == 0 || !opt_.broadcast_logits)
    return {};
  return opt_.world->broadcast(data, words, comm::device_dtype::f32,
                               (lay.pp_size - 1) * lay.tp_size, stream_);
}

expected<void> cuda_backend_impl::forward(const step_plan& plan, forward_output& out) {
  TROUPE_TRY_VOID(upload(plan));
  prepare_output(plan, config_.vocab_size, out, makes_logits());
  if (T_ == 0)
    return {};
  TROUPE_TRY_VOID(run_step(&plan));
  TROUPE_TRY_VOID(from_last_stage(logits_, out.logits.size()));
  if (!out.logits.empty()) // none when no sequence wants logits this step
    TROUPE_CUDA(cudaMemcpyAsync(out.logits.data(), logits_, out.logits.size() * 4,
                                cudaMemcpyDeviceToHost, stream_));
  return sync();
}

expected<float*> cuda_backend_impl::forward_on_device(const step_plan& plan, forward_output& out) {
  TROUPE_TRY_VOID(upload(plan));
  const int32_t rows = prepare_output(plan, config_.vocab_size, out, false);
  if (T_ == 0)
    return nullptr;
  TROUPE_TRY_VOID(run_step(&plan)); // also for steps without logits: they write KV
  if (rows == 0)
    return nullptr;
  TROUPE_TRY_VOID(from_last_stage(logits_, static_cast<size_t>(rows) * config_.vocab_size));
  return logits_;
}

expected<void> cuda_backend_impl::forward_greedy(const step_plan& plan,
                                                 std::vector<token_id>& tokens) {
  TROUPE_TRY_VOID(upload(plan));
  tokens.resize(static_cast<size_t>(R_ - pad_));
  if (T_ == 0)
    return {};
  TROUPE_TRY_VOID(run_step(&plan));
  if (last_stage_)
    TROUPE_TRY_VOID(
        argmax_rows(logits_, R_, static_cast<int>(config_.vocab_size), argmax_, stream_));
  TROUPE_TRY_VOID(from_last_stage(argmax_, tokens.size())); // int32 ids travel as 4-byte words
  if (!tokens.empty())
    TROUPE_CUDA(cudaMemcpyAsync(tokens.data(), argmax_, tokens.size() * 4, cudaMemcpyDeviceToHost,
                                stream_));
  return sync();
}

expected<std::unique_ptr<cuda_backend>> make_backend(const model_config& config,
                                                     const weight_source* weights,
                                                     kv_cache_options kv, cuda_options options) {
  auto b = std::make_unique<cuda_backend_impl>();
  if (auto r = b->init(config, weights, kv, options); !r)
    return std::move(r).error().context("CUDA backend for " + config.architecture);
  return std::unique_ptr<cuda_backend>(std::move(b));
}

} // namespace troupe::engine::cuda
