#include "engine/backend/shard.hpp"

#include <fmt/format.h>

namespace troupe::engine {

index_range split_range(int64_t n, int parts, int r) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

namespace {

expected<void> check_expert_layout(const model_config& c, int tensor, int expert) {
  auto fail = [](std::string msg) { return error{errc::invalid_argument, std::move(msg)}; };
  if (expert == 0) { // whole experts on every tensor rank, split as evenly as they go
    if (c.num_experts > 0 && c.num_experts < tensor)
      return fail(fmt::format("num_experts={} is fewer than tensor={}: every rank needs an expert",
                              c.num_experts, tensor));
    return {};
  }
  if (expert < 0)
    return fail(fmt::format("expert={} must be at least 1 (or 0: tensor)", expert));
  if (c.num_experts == 0) {
    if (expert > 1)
      return fail(fmt::format(
          "expert={} needs a mixture-of-experts model (this one has no experts)", expert));
    return {};
  }
  if (expert > tensor || tensor % expert != 0)
    return fail(fmt::format("expert={} does not divide tensor={}: the tensor ranks form expert "
                            "groups of the same size",
                            expert, tensor));
  if (c.num_experts % expert != 0)
    return fail(fmt::format("num_experts={} is not divisible by expert={}: every expert group "
                            "holds the same number of whole experts",
                            c.num_experts, expert));
  const int slices = tensor / expert;
  if (c.moe_intermediate_size % slices != 0)
    return fail(fmt::format("moe_intermediate_size={} is not divisible by tensor/expert={} (the "
                            "ranks of an expert group slice each expert's intermediate dimension)",
                            c.moe_intermediate_size, slices));
  return {};
}

} // namespace

expected<void> check_parallel_layout(const model_config& c, int tensor, int pipeline, int expert) {
  auto fail = [](std::string msg) { return error{errc::invalid_argument, std::move(msg)}; };
  if (tensor < 1 || pipeline < 1)
    return fail(fmt::format("tensor={} and pipeline={} must both be at least 1", tensor, pipeline));
  if (c.num_heads % tensor != 0)
    return fail(
        fmt::format("num_attention_heads={} is not divisible by tensor={}", c.num_heads, tensor));
  if (tensor <= c.num_kv_heads && c.num_kv_heads % tensor != 0)
    return fail(fmt::format("num_key_value_heads={} is not divisible by tensor={}", c.num_kv_heads,
                            tensor));
  if (tensor > c.num_kv_heads && tensor % c.num_kv_heads != 0)
    return fail(fmt::format("tensor={} is not a multiple of num_key_value_heads={} (kv heads are "
                            "replicated only when each is shared by the same number of ranks)",
                            tensor, c.num_kv_heads));
  TROUPE_TRY_VOID(check_expert_layout(c, tensor, expert));
  if (c.intermediate_size > 0 && c.intermediate_size < tensor) // 0: every layer is MoE
    return fail(
        fmt::format("intermediate_size={} is smaller than tensor={}", c.intermediate_size, tensor));
  if (c.num_layers < pipeline)
    return fail(fmt::format("num_hidden_layers={} is fewer than pipeline={} stages", c.num_layers,
                            pipeline));
  return {};
}

expected<shard_plan> plan_shard(const model_config& c, const parallel_layout& p) {
  TROUPE_TRY_VOID(check_parallel_layout(c, p.tp_size, p.pp_size, p.ep_size));
  if (p.tp_rank < 0 || p.tp_rank >= p.tp_size || p.pp_rank < 0 || p.pp_rank >= p.pp_size)
    return make_error(errc::invalid_argument,
                      "rank (tensor {}, pipeline {}) is outside a {} x {} grid", p.tp_rank,
                      p.pp_rank, p.tp_size, p.pp_size);
  shard_plan s;
  s.heads = split_range(c.num_heads, p.tp_size, p.tp_rank);
  if (p.tp_size <= c.num_kv_heads) {
    s.kv_heads = split_range(c.num_kv_heads, p.tp_size, p.tp_rank);
  } else {
    const int64_t kvh = p.tp_rank / (p.tp_size / c.num_kv_heads);
    s.kv_heads = {kvh, kvh + 1};
  }
  s.intermediate = split_range(c.intermediate_size, p.tp_size, p.tp_rank);
  const int groups = p.expert_groups(), per_group = p.tp_size / groups;
  s.experts = split_range(c.num_experts, groups, p.tp_rank / per_group);
  s.expert_slice = split_range(c.moe_intermediate_size, per_group, p.tp_rank % per_group);
  s.vocab_chunk = (c.vocab_size + p.tp_size - 1) / p.tp_size;
  s.vocab = {std::min(c.vocab_size, p.tp_rank * s.vocab_chunk),
             std::min(c.vocab_size, (p.tp_rank + 1) * s.vocab_chunk)};
  s.layers = split_range(c.num_layers, p.pp_size, p.pp_rank);
  return s;
}

kv_layout shard_kv_layout(const model_config& c, const shard_plan& s, int32_t block_size,
                          int32_t num_blocks, std::string dtype, int32_t elem_bytes) {
  return {.dtype = std::move(dtype),
          .elem_bytes = elem_bytes,
          .num_layers = static_cast<int32_t>(c.num_layers),
          .layer_begin = static_cast<int32_t>(s.layers.begin),
          .layer_end = static_cast<int32_t>(s.layers.end),
          .num_kv_heads = static_cast<int32_t>(c.num_kv_heads),
          .head_begin = static_cast<int32_t>(s.kv_heads.begin),
          .head_end = static_cast<int32_t>(s.kv_heads.end),
          .head_dim = static_cast<int32_t>(c.head_dim),
          .block_size = block_size,
          .num_blocks = num_blocks};
}

weight_slice rows_of(std::string name, std::vector<int64_t> shape, index_range r) {
  return {std::move(name), std::move(shape), r.begin, r.end, false};
}
weight_slice cols_of(std::string name, std::vector<int64_t> shape, index_range r) {
  return {std::move(name), std::move(shape), r.begin, r.end, true};
}
weight_slice whole(std::string name, std::vector<int64_t> shape) {
  const int64_t n = shape[0];
  return {std::move(name), std::move(shape), 0, n, false};
}

namespace {

void layer_reads(const model_config& c, const shard_plan& s, const parallel_layout& lay,
                 shard_reader reader, int64_t l, std::vector<weight_slice>& out) {
  const int64_t H = c.hidden_size, D = c.head_dim;
  const index_range q{s.heads.begin * D, s.heads.end * D};
  const index_range kv{s.kv_heads.begin * D, s.kv_heads.end * D};
  const std::string p = fmt::format("model.layers.{}.", l), a = p + "self_attn.";
  out.push_back(whole(p + "input_layernorm.weight", {H}));
  out.push_back(whole(p + "post_attention_layernorm.weight", {H}));
  out.push_back(rows_of(a + "q_proj.weight", {c.q_size(), H}, q));
  out.push_back(rows_of(a + "k_proj.weight", {c.kv_size(), H}, kv));
  out.push_back(rows_of(a + "v_proj.weight", {c.kv_size(), H}, kv));
  out.push_back(cols_of(a + "o_proj.weight", {H, c.q_size()}, q));
  if (c.attention_bias) {
    out.push_back(rows_of(a + "q_proj.bias", {c.q_size()}, q));
    out.push_back(rows_of(a + "k_proj.bias", {c.kv_size()}, kv));
    out.push_back(rows_of(a + "v_proj.bias", {c.kv_size()}, kv));
  }
  if (c.o_proj_bias && (reader == shard_reader::cuda || lay.tp_rank == 0))
    out.push_back(whole(a + "o_proj.bias", {H}));
  if (c.qk_norm) {
    out.push_back(whole(a + "q_norm.weight", {D}));
    out.push_back(whole(a + "k_norm.weight", {D}));
  }
  if (c.is_moe_layer(l)) {
    const int64_t I = c.moe_intermediate_size;
    out.push_back(whole(p + "mlp.gate.weight", {c.num_experts, H}));
    for (int64_t e = s.experts.begin; e < s.experts.end; ++e) {
      const std::string ep = fmt::format("{}mlp.experts.{}.", p, e);
      out.push_back(rows_of(ep + "gate_proj.weight", {I, H}, s.expert_slice));
      out.push_back(rows_of(ep + "up_proj.weight", {I, H}, s.expert_slice));
      out.push_back(cols_of(ep + "down_proj.weight", {H, I}, s.expert_slice));
    }
  } else {
    const int64_t I = c.intermediate_size;
    out.push_back(rows_of(p + "mlp.gate_proj.weight", {I, H}, s.intermediate));
    out.push_back(rows_of(p + "mlp.up_proj.weight", {I, H}, s.intermediate));
    out.push_back(cols_of(p + "mlp.down_proj.weight", {H, I}, s.intermediate));
  }
}

} // namespace

std::vector<weight_slice> shard_weight_reads(const model_config& c, const shard_plan& s,
                                             const parallel_layout& lay, shard_reader reader) {
  std::vector<weight_slice> out;
  const int64_t H = c.hidden_size;
  const bool last = s.layers.end == c.num_layers;
  const auto embed = rows_of("model.embed_tokens.weight", {c.vocab_size, H}, s.vocab);
  // The embedding on the first stage; on the last the lm_head, or the tied embedding's rows
  // again where the first stage is another rank.
  if (s.first_stage())
    out.push_back(embed);
  if (last && c.tie_word_embeddings && !s.first_stage())
    out.push_back(embed);
  if (last || reader == shard_reader::cuda)
    out.push_back(whole("model.norm.weight", {H}));
  if (last && !c.tie_word_embeddings)
    out.push_back(rows_of("lm_head.weight", {c.vocab_size, H}, s.vocab));
  for (int64_t l = s.layers.begin; l < s.layers.end; ++l)
    layer_reads(c, s, lay, reader, l, out);
  return out;
}

} // namespace troupe::engine
