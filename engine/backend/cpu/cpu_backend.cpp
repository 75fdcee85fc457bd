#include "engine/backend/cpu/cpu_backend.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>

#include "engine/backend/cpu/ops.hpp"
#include "engine/model/gguf_weights.hpp"
#include "engine/model/rope.hpp"

namespace troupe::engine {

using cpu::matmul_nt;
using cpu::rms_norm;

namespace {

// Loads `name` with `shape` (whole, rows [range) or columns [range)) into `dst`, or returns the
// error from the enclosing function.
#define TROUPE_LOAD(dst, name, ...) TROUPE_ASSIGN(dst, w.load_f32(name, {__VA_ARGS__}))
#define TROUPE_LOAD_ROWS(dst, name, range, ...)                                                    \
  TROUPE_ASSIGN(dst, w.load_f32_rows(name, {__VA_ARGS__}, (range).begin, (range).end))
#define TROUPE_LOAD_COLS(dst, name, range, ...)                                                    \
  TROUPE_ASSIGN(dst, w.load_f32_cols(name, {__VA_ARGS__}, (range).begin, (range).end))

} // namespace

expected<std::unique_ptr<cpu_backend>> cpu_backend::load(const std::filesystem::path& model_dir,
                                                         kv_cache_options kv) {
  return load(model_dir, kv, {});
}

expected<std::unique_ptr<cpu_backend>> cpu_backend::load(const std::filesystem::path& model_dir,
                                                         kv_cache_options kv, parallel_context par,
                                                         const load_callback& progress) {
  return open_model(
      model_dir,
      [&](model_config config,
          const weight_source& weights) -> expected<std::unique_ptr<cpu_backend>> {
        // One rank of one: the parallel context's communicators are not needed.
        const parallel_context ctx = par.layout.world_size() > 1 ? par : parallel_context{};
        if (!progress)
          return create(std::move(config), weights, kv, ctx);
        auto shard = shard_of(config, ctx);
        if (!shard)
          return std::move(shard).error();
        auto total = total_read_bytes(
            weights, shard_weight_reads(config, *shard, ctx.layout, shard_reader::cpu));
        if (!total)
          return std::move(total).error();
        load_progress counter(*total, progress);
        auto b = create(std::move(config), counted_weights(weights, counter), kv, ctx);
        if (b)
          counter.finish();
        return b;
      });
}

namespace {

// Host memory the kernel says a new allocation can get (MemAvailable), or total RAM where
// /proc/meminfo is absent.
uint64_t host_memory_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:")
      return kib * 1024;
  return static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) *
         static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// The float32 K and V caches of this rank's layers must fit in host memory: a num_kv_blocks
// typo (1e9) is an error with the numbers, not std::bad_alloc.
expected<void> check_kv_fits(const model_config& c, const shard_plan& s, kv_cache_options kv) {
  const double bytes = 2.0 * sizeof(float) * static_cast<double>(s.layers.size()) * kv.num_blocks *
                       kv.block_size * s.kv_heads.size() * c.head_dim;
  const double avail = static_cast<double>(host_memory_available());
  if (bytes > avail)
    return make_error(errc::resource_exhausted,
                      "the KV cache of {} blocks of {} tokens needs {:.2f} GiB of host memory; "
                      "{:.2f} GiB is available: lower num_kv_blocks (or max_num_seqs)",
                      kv.num_blocks, kv.block_size, bytes / 1073741824.0, avail / 1073741824.0);
  return {};
}

} // namespace

expected<shard_plan> cpu_backend::shard_of(const model_config& config,
                                           const parallel_context& par) {
  auto shard = plan_shard(config, par.layout);
  if (!shard || par.experts == nullptr)
    return shard;
  if (par.layout.tp_size != 1 || par.layout.pp_size != 1)
    return make_error(errc::invalid_argument,
                      "expert all-to-all over data-parallel attention needs tensor = pipeline = "
                      "1 on each rank, not {} x {}",
                      par.layout.tp_size, par.layout.pp_size);
  if (config.num_experts < par.experts->size())
    return make_error(errc::invalid_argument,
                      "num_experts={} is fewer than the {} ranks of the expert group",
                      config.num_experts, par.experts->size());
  shard->experts = split_range(config.num_experts, par.experts->size(), par.experts->rank());
  return shard;
}

expected<std::unique_ptr<cpu_backend>>
cpu_backend::create(model_config config, const weight_source& w, kv_cache_options kv) {
  return create(std::move(config), w, kv, parallel_context{});
}

expected<std::unique_ptr<cpu_backend>> cpu_backend::create(model_config config,
                                                           const weight_source& w,
                                                           kv_cache_options kv,
                                                           parallel_context par) {
  if (kv.num_blocks <= 0 || kv.block_size <= 0)
    return make_error(errc::invalid_argument, "KV cache needs num_blocks > 0 and block_size > 0");
  auto shard = shard_of(config, par);
  if (!shard)
    return std::move(shard).error();
  TROUPE_TRY_VOID(check_kv_fits(config, *shard, kv));
  std::unique_ptr<cpu_backend> b(new cpu_backend());
  if (par.tensor == nullptr) {
    if (par.layout.tp_size != 1)
      return make_error(errc::invalid_argument, "tensor > 1 needs a tensor communicator");
    b->own_comm_ = comm::make_single_rank_communicator();
    par.tensor = b->own_comm_.get();
  }
  if (par.tensor->size() != par.layout.tp_size || par.tensor->rank() != par.layout.tp_rank)
    return make_error(
        errc::invalid_argument, "tensor communicator is rank {} of {}, layout says {} of {}",
        par.tensor->rank(), par.tensor->size(), par.layout.tp_rank, par.layout.tp_size);
  if (par.layout.pp_size > 1 &&
      (par.world == nullptr || par.world->size() != par.layout.world_size() ||
       par.world->rank() != par.layout.world_rank()))
    return make_error(errc::invalid_argument,
                      "pipeline={} needs a world communicator of {} ranks with this "
                      "rank at {}",
                      par.layout.pp_size, par.layout.world_size(), par.layout.world_rank());
  b->config_ = std::move(config);
  b->kv_ = kv;
  b->par_ = par;
  b->shard_ = *shard;
  const auto& c = b->config_;
  const auto& s = b->shard_;
  const bool last = s.layers.end == c.num_layers;
  if (s.first_stage() || (last && c.tie_word_embeddings))
    TROUPE_LOAD_ROWS(b->embed_, "model.embed_tokens.weight", s.vocab, c.vocab_size, c.hidden_size);
  if (last) {
    TROUPE_LOAD(b->final_norm_, "model.norm.weight", c.hidden_size);
    if (!c.tie_word_embeddings)
      TROUPE_LOAD_ROWS(b->lm_head_, "lm_head.weight", s.vocab, c.vocab_size, c.hidden_size);
  }
  b->layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = s.layers.begin; l < s.layers.end; ++l)
    TROUPE_TRY_VOID(b->load_layer(w, l));
  b->inv_freq_ = rope_inv_freq(c);
  size_t cache =
      static_cast<size_t>(s.layers.size()) * kv.num_blocks * kv.block_size * b->kv_local();
  b->k_cache_.assign(cache, 0.0f);
  b->v_cache_.assign(cache, 0.0f);
  return b;
}

expected<void> cpu_backend::load_layer(const weight_source& w, int64_t l) {
  const auto& c = config_;
  const auto& s = shard_;
  auto& L = layers_[static_cast<size_t>(l)];
  const std::string p = fmt::format("model.layers.{}.", l);
  const int64_t H = c.hidden_size, D = c.head_dim;
  const index_range q_rows{s.heads.begin * D, s.heads.end * D};
  const index_range kv_rows{s.kv_heads.begin * D, s.kv_heads.end * D};
  TROUPE_LOAD(L.input_norm, p + "input_layernorm.weight", H);
  TROUPE_LOAD(L.post_norm, p + "post_attention_layernorm.weight", H);
  TROUPE_LOAD_ROWS(L.wq, p + "self_attn.q_proj.weight", q_rows, c.q_size(), H);
  TROUPE_LOAD_ROWS(L.wk, p + "self_attn.k_proj.weight", kv_rows, c.kv_size(), H);
  TROUPE_LOAD_ROWS(L.wv, p + "self_attn.v_proj.weight", kv_rows, c.kv_size(), H);
  TROUPE_LOAD_COLS(L.wo, p + "self_attn.o_proj.weight", q_rows, H, c.q_size());
  if (c.attention_bias) {
    TROUPE_LOAD_ROWS(L.bq, p + "self_attn.q_proj.bias", q_rows, c.q_size());
    TROUPE_LOAD_ROWS(L.bk, p + "self_attn.k_proj.bias", kv_rows, c.kv_size());
    TROUPE_LOAD_ROWS(L.bv, p + "self_attn.v_proj.bias", kv_rows, c.kv_size());
  }
  if (c.o_proj_bias && par_.layout.tp_rank == 0) // added once, before the all-reduce
    TROUPE_LOAD(L.bo, p + "self_attn.o_proj.bias", H);
  if (c.qk_norm) {
    TROUPE_LOAD(L.q_norm, p + "self_attn.q_norm.weight", D);
    TROUPE_LOAD(L.k_norm, p + "self_attn.k_norm.weight", D);
  }
  if (c.is_moe_layer(l)) {
    // Only this rank's experts, and of each only its slice of the intermediate dimension.
    const int64_t I = c.moe_intermediate_size;
    TROUPE_LOAD(L.router, p + "mlp.gate.weight", c.num_experts, H);
    L.experts.resize(static_cast<size_t>(s.experts.size()));
    for (int64_t e = s.experts.begin; e < s.experts.end; ++e) {
      auto& E = L.experts[static_cast<size_t>(e - s.experts.begin)];
      const std::string ep = fmt::format("{}mlp.experts.{}.", p, e);
      TROUPE_LOAD_ROWS(E.gate, ep + "gate_proj.weight", s.expert_slice, I, H);
      TROUPE_LOAD_ROWS(E.up, ep + "up_proj.weight", s.expert_slice, I, H);
      TROUPE_LOAD_COLS(E.down, ep + "down_proj.weight", s.expert_slice, H, I);
    }
    for (const auto& E : L.experts)
      L.expert_views.push_back({E.gate.data(), E.up.data(), E.down.data()});
  } else {
    const int64_t I = c.intermediate_size;
    TROUPE_LOAD_ROWS(L.gate, p + "mlp.gate_proj.weight", s.intermediate, I, H);
    TROUPE_LOAD_ROWS(L.up, p + "mlp.up_proj.weight", s.intermediate, I, H);
    TROUPE_LOAD_COLS(L.down, p + "mlp.down_proj.weight", s.intermediate, H, I);
  }
  return {};
}

kv_layout cpu_backend::kv_memory() const {
  auto k =
      shard_kv_layout(config_, shard_, kv_.block_size, kv_.num_blocks, "float32", sizeof(float));
  k.allocations = {{k_cache_.data(), k_cache_.size() * sizeof(float), false},
                   {v_cache_.data(), v_cache_.size() * sizeof(float), false}};
  const uint64_t plane = static_cast<uint64_t>(kv_.num_blocks) * kv_.block_size * k.token_bytes();
  for (int64_t l = 0; l < shard_.layers.size(); ++l) {
    k.planes.push_back({0, static_cast<uint64_t>(l) * plane});
    k.planes.push_back({1, static_cast<uint64_t>(l) * plane});
  }
  return k;
}

float* cpu_backend::k_block(int64_t l, int32_t block) const {
  size_t per_block = static_cast<size_t>(kv_.block_size * kv_local());
  return k_cache_.data() +
         (static_cast<size_t>(l - shard_.layers.begin) * kv_.num_blocks + block) * per_block;
}

float* cpu_backend::v_block(int64_t l, int32_t block) const {
  size_t per_block = static_cast<size_t>(kv_.block_size * kv_local());
  return v_cache_.data() +
         (static_cast<size_t>(l - shard_.layers.begin) * kv_.num_blocks + block) * per_block;
}

expected<void> cpu_backend::embed(const step_plan& plan, std::vector<float>& x) {
  // Vocab-parallel lookup: each tensor rank fills the rows of its tokens, the sum joins them.
  const int64_t H = config_.hidden_size;
  std::fill(x.begin(), x.end(), 0.0f);
  int64_t t = 0;
  for (const auto& s : plan.seqs)
    for (auto tok : s.tokens) {
      if (shard_.vocab.contains(tok))
        std::copy_n(embed_.data() + (tok - shard_.vocab.begin) * H, H, x.data() + t * H);
      ++t;
    }
  return par_.tensor->all_reduce_sum(x);
}

expected<void> cpu_backend::logits(const std::vector<float>& h, int32_t rows, forward_output& out) {
  // Vocab-parallel lm_head: each rank its [rows, vocab_chunk] slice, gathered and reassembled.
  const int64_t H = config_.hidden_size, V = config_.vocab_size, chunk = shard_.vocab_chunk;
  const int tp = par_.layout.tp_size;
  if (tp == 1) {
    matmul_nt(h.data(), rows, H, head().data(), V, out.logits.data());
    return {};
  }
  std::vector<float> mine(static_cast<size_t>(rows * chunk), 0.0f),
      part(static_cast<size_t>(rows * shard_.vocab.size()));
  matmul_nt(h.data(), rows, H, head().data(), shard_.vocab.size(), part.data());
  for (int32_t r = 0; r < rows; ++r)
    std::copy_n(part.data() + r * shard_.vocab.size(), shard_.vocab.size(),
                mine.data() + r * chunk);
  std::vector<float> all(static_cast<size_t>(tp) * mine.size());
  TROUPE_TRY_VOID(par_.tensor->all_gather(mine, all));
  for (int k = 0; k < tp; ++k) {
    const index_range v{std::min(V, k * chunk), std::min(V, (k + 1) * chunk)};
    for (int32_t r = 0; r < rows; ++r)
      std::copy_n(all.data() + (static_cast<size_t>(k) * rows + r) * chunk, v.size(),
                  out.logits.data() + r * V + v.begin);
  }
  return {};
}

expected<void> cpu_backend::forward(const step_plan& plan, forward_output& out) {
  const bool listening = listener_ != nullptr && listener_->step_begins(plan);
  auto done = run(plan, out, listening);
  if (listening)
    listener_->step_ends(done.has_value());
  return done;
}

expected<void> cpu_backend::run(const step_plan& plan, forward_output& out, bool listening) {
  TROUPE_TRY_VOID(validate_plan(plan, config_, kv_));
  const auto& c = config_;
  const int64_t H = c.hidden_size;
  const auto& lay = par_.layout;
  batch b;
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const auto& s = plan.seqs[i];
    for (size_t j = 0; j < s.tokens.size(); ++j) {
      b.positions.push_back(s.start_pos + static_cast<int32_t>(j));
      b.seq_of.push_back(static_cast<int32_t>(i));
    }
  }
  const int64_t T = static_cast<int64_t>(b.positions.size());
  constexpr uint32_t hidden_tag = 1;

  // x[T, H]: the residual stream, embedded here or received from the previous stage.
  std::vector<float> x(static_cast<size_t>(T * H));
  if (shard_.first_stage())
    TROUPE_TRY_VOID(embed(plan, x));
  else
    TROUPE_TRY_VOID(par_.world->recv(x, lay.world_rank() - lay.tp_size, hidden_tag));

  for (int64_t l = shard_.layers.begin; l < shard_.layers.end; ++l) {
    const auto& L = layers_[static_cast<size_t>(l)];
    TROUPE_TRY_VOID(attention_block(L, l, plan, b, x));
    if (listening) // its keys and values are in the cache now
      listener_->layer_written(static_cast<int32_t>(l), [] { return expected<void>{}; });
    TROUPE_TRY_VOID(mlp_block(L, x, T));
  }

  int32_t rows = prepare_output(plan, c.vocab_size, out, makes_logits());
  const bool last = shard_.layers.end == c.num_layers;
  if (!last)
    TROUPE_TRY_VOID(par_.world->send(x, lay.world_rank() + lay.tp_size, hidden_tag));
  if (last) {
    // Final norm and lm_head only for the rows that asked for logits.
    std::vector<float> h(static_cast<size_t>(rows * H));
    int32_t r = 0;
    int64_t t = 0;
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      const int64_t n = static_cast<int64_t>(plan.seqs[i].tokens.size());
      const int64_t first = t + n - out.num_rows[i]; // all rows, or only the last one
      for (int64_t k = first; k < t + n; ++k)
        rms_norm(x.data() + k * H, 1, H, final_norm_.data(), c.rms_norm_eps, h.data() + (r++) * H);
      t += n;
    }
    TROUPE_TRY_VOID(logits(h, rows, out));
  }
  if (lay.pp_size > 1 && rows > 0 && par_.broadcast_logits) // every rank leaves with them
    TROUPE_TRY_VOID(par_.world->broadcast(out.logits, (lay.pp_size - 1) * lay.tp_size));
  return {};
}

bool cpu_backend::makes_logits() const {
  return par_.broadcast_logits || shard_.layers.end == config_.num_layers;
}

expected<void> cpu_backend::attention_block(const layer& L, int64_t l, const step_plan& plan,
                                            const batch& b, std::vector<float>& x) {
  // This rank's heads only; o_proj's partial sums are joined by one all-reduce.
  const auto& c = config_;
  const int64_t T = static_cast<int64_t>(b.positions.size());
  const int64_t H = c.hidden_size, D = c.head_dim;
  const int64_t Q = q_local(), KV = kv_local();
  const int64_t heads = shard_.heads.size(), kv_heads = shard_.kv_heads.size();
  std::vector<float> h(static_cast<size_t>(T * H));
  rms_norm(x.data(), T, H, L.input_norm.data(), c.rms_norm_eps, h.data());

  std::vector<float> q(static_cast<size_t>(T * Q));
  std::vector<float> k(static_cast<size_t>(T * KV));
  std::vector<float> v(static_cast<size_t>(T * KV));
  auto bias = [](const std::vector<float>& bv) { return bv.empty() ? nullptr : bv.data(); };
  matmul_nt(h.data(), T, H, L.wq.data(), Q, q.data(), bias(L.bq));
  matmul_nt(h.data(), T, H, L.wk.data(), KV, k.data(), bias(L.bk));
  matmul_nt(h.data(), T, H, L.wv.data(), KV, v.data(), bias(L.bv));
  if (c.qk_norm) {
    rms_norm(q.data(), T * heads, D, L.q_norm.data(), c.rms_norm_eps, q.data());
    rms_norm(k.data(), T * kv_heads, D, L.k_norm.data(), c.rms_norm_eps, k.data());
  }
  for (int64_t t = 0; t < T; ++t) {
    cpu::apply_rope(q.data() + t * Q, heads, D, b.positions[t], inv_freq_);
    cpu::apply_rope(k.data() + t * KV, kv_heads, D, b.positions[t], inv_freq_);
  }
  // Write this step's keys and values into their paged slots before attending, so that a token
  // sees every earlier token of its sequence, whether cached in an earlier step or fed now.
  for (int64_t t = 0; t < T; ++t) {
    const auto& s = plan.seqs[static_cast<size_t>(b.seq_of[t])];
    int32_t pos = b.positions[t];
    int32_t block = s.block_table[static_cast<size_t>(pos / kv_.block_size)];
    size_t slot = static_cast<size_t>((pos % kv_.block_size) * KV);
    std::copy_n(k.data() + t * KV, KV, k_block(l, block) + slot);
    std::copy_n(v.data() + t * KV, KV, v_block(l, block) + slot);
  }
  std::vector<float> attn(static_cast<size_t>(T * Q));
  int64_t t = 0;
  for (const auto& s : plan.seqs) {
    for (size_t j = 0; j < s.tokens.size(); ++j, ++t) {
      attend(l, s.block_table, s.start_pos + static_cast<int32_t>(j), q.data() + t * Q,
             attn.data() + t * Q);
    }
  }
  std::vector<float> o(static_cast<size_t>(T * H));
  matmul_nt(attn.data(), T, Q, L.wo.data(), H, o.data(), bias(L.bo));
  TROUPE_TRY_VOID(par_.tensor->all_reduce_sum(o));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] += o[i];
  return {};
}

void cpu_backend::attend(int64_t l, std::span<const int32_t> table, int32_t pos, const float* q,
                         float* out) const {
  // The query at `pos` over keys 0..pos of its sequence (causal), grouped-query heads.
  const auto& c = config_;
  const int64_t D = c.head_dim;
  const int64_t heads = shard_.heads.size(), kv = kv_local();
  const int64_t group = heads / shard_.kv_heads.size();
  const int32_t ctx = pos + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> scores(static_cast<size_t>(ctx));
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kvh = h / group;
    const float* qh = q + h * D;
    for (int32_t j = 0; j < ctx; ++j) {
      const float* kj = k_block(l, table[static_cast<size_t>(j / kv_.block_size)]) +
                        (j % kv_.block_size) * kv + kvh * D;
      float dot = 0;
      for (int64_t d = 0; d < D; ++d)
        dot += qh[d] * kj[d];
      scores[static_cast<size_t>(j)] = dot * scale;
    }
    cpu::softmax(scores.data(), ctx);
    float* oh = out + h * D;
    std::fill_n(oh, D, 0.0f);
    for (int32_t j = 0; j < ctx; ++j) {
      const float* vj = v_block(l, table[static_cast<size_t>(j / kv_.block_size)]) +
                        (j % kv_.block_size) * kv + kvh * D;
      const float p = scores[static_cast<size_t>(j)];
      for (int64_t d = 0; d < D; ++d)
        oh[d] += p * vj[d];
    }
  }
}

expected<void> cpu_backend::mlp_block(const layer& L, std::vector<float>& x, int64_t n) {
  // This rank's intermediate slice (or experts' slices); down_proj's partial sums joined by
  // all-reduce.
  const auto& c = config_;
  const int64_t H = c.hidden_size;
  std::vector<float> h(static_cast<size_t>(n * H));
  rms_norm(x.data(), n, H, L.post_norm.data(), c.rms_norm_eps, h.data());
  std::vector<float> y(static_cast<size_t>(n * H));
  if (!L.experts.empty() && par_.experts != nullptr) {
    // This rank's tokens only: dispatched to the experts' ranks and combined here; nothing to
    // all-reduce (tensor = 1).
    const cpu::moe_shape s{.hidden = c.hidden_size,
                           .experts = c.num_experts,
                           .top_k = c.num_experts_per_tok,
                           .intermediate = c.moe_intermediate_size,
                           .norm_topk_prob = c.norm_topk_prob};
    TROUPE_TRY_VOID(cpu::moe_all_to_all(*par_.experts, s, L.router.data(), L.expert_views, h.data(),
                                        n, y.data()));
  } else if (!L.experts.empty()) {
    moe(L, h.data(), n, y.data());
  } else {
    const int64_t I = shard_.intermediate.size();
    std::vector<float> g(static_cast<size_t>(n * I)), u(static_cast<size_t>(n * I));
    matmul_nt(h.data(), n, H, L.gate.data(), I, g.data());
    matmul_nt(h.data(), n, H, L.up.data(), I, u.data());
    cpu::silu_mul(g.data(), u.data(), n, I, g.data());
    matmul_nt(g.data(), n, I, L.down.data(), H, y.data());
  }
  TROUPE_TRY_VOID(par_.tensor->all_reduce_sum(y));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] += y[i];
  return {};
}

void cpu_backend::moe(const layer& L, const float* h, int64_t n, float* out) const {
  // Softmax router, top-k experts per token (ties to the lower id), optionally renormalised;
  // only this rank's experts (its slice of each) contribute to `out` (the caller all-reduces).
  const auto& c = config_;
  const cpu::moe_shape s{.hidden = c.hidden_size,
                         .experts = c.num_experts,
                         .top_k = c.num_experts_per_tok,
                         .intermediate = shard_.expert_slice.size(),
                         .norm_topk_prob = c.norm_topk_prob};
  std::vector<int32_t> ids;
  std::vector<float> weights;
  cpu::moe_route(s, L.router.data(), h, n, ids, weights);
  cpu::moe_local(s, ids.data(), weights.data(), n, h, shard_.experts.begin, L.expert_views, out);
}

} // namespace troupe::engine
