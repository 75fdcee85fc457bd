#include "engine/backend/backend.hpp"

#include <unordered_set>

namespace troupe::engine {

expected<void> backend::set_kv_listener(std::shared_ptr<kv_layer_listener>) {
  return make_error(errc::unsupported, "this backend does not report layers as it computes");
}

expected<void> validate_plan(const step_plan& plan, const model_config& config,
                             const kv_cache_options& kv) {
  std::unordered_set<seq_id> seen;
  for (const auto& s : plan.seqs) {
    if (!seen.insert(s.id).second)
      return make_error(errc::invalid_argument, "step {}: sequence {} appears twice", plan.step,
                        s.id);
    if (s.start_pos < 0)
      return make_error(errc::invalid_argument, "step {}: sequence {} has start_pos {} < 0",
                        plan.step, s.id, s.start_pos);
    if (s.tokens.empty())
      return make_error(errc::invalid_argument, "step {}: sequence {} feeds no tokens", plan.step,
                        s.id);
    for (auto t : s.tokens)
      if (t < 0 || t >= config.vocab_size)
        return make_error(errc::out_of_range,
                          "step {}: sequence {}: token id {} outside the vocabulary [0, {})",
                          plan.step, s.id, t, config.vocab_size);
    int64_t needed_tokens = int64_t{s.start_pos} + static_cast<int64_t>(s.tokens.size());
    int64_t capacity = static_cast<int64_t>(s.block_table.size()) * kv.block_size;
    if (capacity < needed_tokens)
      return make_error(errc::out_of_range,
                        "step {}: sequence {}: block table holds {} tokens, needs {}", plan.step,
                        s.id, capacity, needed_tokens);
    for (auto b : s.block_table)
      if (b < 0 || b >= kv.num_blocks)
        return make_error(errc::out_of_range,
                          "step {}: sequence {}: KV block {} outside the pool [0, {})", plan.step,
                          s.id, b, kv.num_blocks);
  }
  return {};
}

int32_t prepare_output(const step_plan& plan, int64_t vocab_size, forward_output& out,
                       bool host_logits) {
  out.vocab_size = vocab_size;
  out.first_row.assign(plan.seqs.size(), -1);
  out.num_rows.assign(plan.seqs.size(), 0);
  int32_t rows = 0;
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const auto& s = plan.seqs[i];
    int32_t n = s.logits == logits_mode::none   ? 0
                : s.logits == logits_mode::last ? 1
                                                : static_cast<int32_t>(s.tokens.size());
    if (n > 0)
      out.first_row[i] = rows;
    out.num_rows[i] = n;
    rows += n;
  }
  if (host_logits)
    out.logits.assign(static_cast<size_t>(rows) * vocab_size, 0.0f);
  else
    out.logits.clear();
  return rows;
}

} // namespace troupe::engine
