#include "actors/serving/resolve.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "engine/backend/shard.hpp"

namespace troupe::serve {

expected<kv_plan> plan_kv(const deployment_config& c, const engine::model_config& m) {
  kv_plan p;
  const int64_t model_len = m.max_position_embeddings > 0 ? m.max_position_embeddings : 4096;
  p.max_model_len = c.max_model_len > 0 ? c.max_model_len
                                        : static_cast<int32_t>(std::min<int64_t>(model_len, 4096));
  if (m.max_position_embeddings > 0 && p.max_model_len > m.max_position_embeddings)
    return make_error(errc::invalid_argument,
                      "max_model_len {} exceeds the model's max_position_embeddings {}",
                      p.max_model_len, m.max_position_embeddings);
  const int64_t per_seq = (p.max_model_len + c.block_size - 1) / c.block_size;
  if (c.num_kv_blocks > 0) {
    if (c.num_kv_blocks < per_seq)
      return make_error(errc::invalid_argument,
                        "num_kv_blocks {} cannot hold one context of max_model_len {} ({} blocks "
                        "of {} tokens)",
                        c.num_kv_blocks, p.max_model_len, per_seq, c.block_size);
    p.num_blocks = c.num_kv_blocks;
    return p;
  }
  const int64_t block_bytes = 2 * m.num_layers * c.block_size * m.kv_size() * 4;
  const int64_t cap =
      std::max<int64_t>(per_seq, (int64_t{1} << 30) / std::max<int64_t>(1, block_bytes));
  p.num_blocks = static_cast<int32_t>(std::min<int64_t>(per_seq * c.max_num_seqs, cap));
  return p;
}

expected<resolved_deployment> resolve(deployment_config c, engine::model_config model,
                                      std::string_view auto_device) {
  if (c.device == "auto")
    c.device = std::string(auto_device);
  if (c.device != "cpu" && c.device != "cuda")
    return make_error(errc::internal, "device '{}' after resolving auto", c.device);
  if (c.device == "cuda" && c.dtype != "auto" && c.dtype != "bfloat16")
    return make_error(errc::unsupported,
                      "dtype '{}': the CUDA backend computes in bfloat16; use "
                      "dtype: auto or bfloat16",
                      c.dtype);
  if (c.device == "cpu" && c.dtype != "auto" && c.dtype != "float32")
    return make_error(errc::unsupported,
                      "dtype '{}': the CPU backend computes in float32; use "
                      "dtype: auto or float32",
                      c.dtype);
  resolved_deployment r;
  for (const auto& g : replica_groups(c)) {
    auto named = [&](troupe::error e) {
      return g.role.empty() ? std::move(e) : std::move(e).context("the " + g.role + " group");
    };
    if (auto ok = engine::check_parallel_layout(model, g.parallel.tensor, g.parallel.pipeline,
                                                g.parallel.expert);
        !ok)
      return named(ok.error());
    deployment_config gc = c;
    gc.block_size = g.block_size;
    auto kv = plan_kv(gc, model);
    if (!kv)
      return named(kv.error());
    r.groups.push_back({g, *kv});
  }
  r.config = std::move(c);
  r.model = std::move(model);
  return r;
}

} // namespace troupe::serve
