#include "engine/generate.hpp"

#include <algorithm>

namespace troupe::engine {

token_id argmax(std::span<const float> logits) {
  return static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

expected<std::vector<generation>> generate_greedy(backend& model,
                                                  const std::vector<std::vector<token_id>>& prompts,
                                                  const generate_options& options) {
  const auto kv = model.kv_options();
  const auto& config = model.config();
  if (options.max_new_tokens < 0 || options.prefill_chunk < 0)
    return make_error(errc::invalid_argument, "max_new_tokens and prefill_chunk must be >= 0");
  // Deal blocks out round-robin from the top of the pool, so that every sequence's table is
  // non-contiguous and descending: paging bugs cannot hide behind an identity layout.
  std::vector<int32_t> need(prompts.size());
  int64_t total = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty())
      return make_error(errc::invalid_argument, "prompt {} is empty", i);
    int64_t tokens = static_cast<int64_t>(prompts[i].size()) + options.max_new_tokens;
    need[i] = static_cast<int32_t>((tokens + kv.block_size - 1) / kv.block_size);
    total += need[i];
  }
  if (total > kv.num_blocks)
    return make_error(errc::resource_exhausted, "needs {} KV blocks of {} tokens, pool has {}",
                      total, kv.block_size, kv.num_blocks);
  std::vector<generation> out(prompts.size());
  std::vector<std::vector<int32_t>> tables(prompts.size());
  int32_t next_block = kv.num_blocks - 1;
  for (bool more = true; more;) {
    more = false;
    for (size_t i = 0; i < prompts.size(); ++i)
      if (static_cast<int32_t>(tables[i].size()) < need[i]) {
        tables[i].push_back(next_block--);
        more = true;
      }
  }

  std::vector<int32_t> fed(prompts.size(), 0); // tokens already in each sequence's cache
  std::vector<bool> done(prompts.size(), false);
  forward_output result;
  for (uint64_t step = 0;; ++step) {
    step_plan plan;
    plan.step = step;
    std::vector<size_t> who;
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (done[i])
        continue;
      const auto& p = prompts[i];
      seq_step s;
      s.id = i;
      s.start_pos = fed[i];
      s.block_table = tables[i];
      if (fed[i] < static_cast<int32_t>(p.size())) {
        int32_t left = static_cast<int32_t>(p.size()) - fed[i];
        int32_t n = options.prefill_chunk > 0 ? std::min(left, options.prefill_chunk) : left;
        s.tokens.assign(p.begin() + fed[i], p.begin() + fed[i] + n);
        bool last_chunk = n == left;
        s.logits = options.record_prompt_logits ? logits_mode::all
                   : last_chunk                 ? logits_mode::last
                                                : logits_mode::none;
      } else {
        s.tokens = {out[i].output.back()};
        s.logits = logits_mode::last;
      }
      plan.seqs.push_back(std::move(s));
      who.push_back(i);
    }
    if (plan.seqs.empty())
      break;
    TROUPE_TRY_VOID(model.forward(plan, result));
    for (size_t k = 0; k < who.size(); ++k) {
      size_t i = who[k];
      const auto& s = plan.seqs[k];
      fed[i] += static_cast<int32_t>(s.tokens.size());
      const bool prompt_done = fed[i] >= static_cast<int32_t>(prompts[i].size());
      if (options.record_prompt_logits && s.logits == logits_mode::all)
        for (int32_t r = 0; r < result.num_rows[k]; ++r)
          out[i].prompt_argmax.push_back(argmax(result.row(result.first_row[k] + r)));
      if (!prompt_done)
        continue;
      auto last = result.last_row(k);
      if (options.record_prompt_logits && out[i].output.empty())
        out[i].last_prompt_logits.assign(last.begin(), last.end());
      if (static_cast<int32_t>(out[i].output.size()) >= options.max_new_tokens) {
        done[i] = true;
        continue;
      }
      token_id next = argmax(last);
      out[i].output.push_back(next);
      const auto& eos = config.eos_token_ids;
      if (static_cast<int32_t>(out[i].output.size()) >= options.max_new_tokens ||
          (options.stop_at_eos && std::find(eos.begin(), eos.end(), next) != eos.end()))
        done[i] = true;
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i)
    out[i].prompt = prompts[i];
  return out;
}

} // namespace troupe::engine
