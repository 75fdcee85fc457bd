#include "engine/exec/executor.hpp"

namespace troupe::engine {

expected<step_result> executor::run(step_plan& plan, const mask_fill& fill) {
  for (seq_id id : plan.finished)
    sampled_.erase(id);
  for (auto& s : plan.seqs)
    for (auto& t : s.tokens) {
      if (t != previous_sample)
        continue;
      auto it = sampled_.find(s.id);
      if (it == sampled_.end())
        return make_error(errc::internal,
                          "step {}: sequence {} feeds the token it sampled in the step before, "
                          "but this rank sampled none for it",
                          plan.step, s.id);
      t = it->second;
    }
  auto r = execute_filling(plan, fill);
  if (!r) {
    sampled_.clear(); // what this step sampled is unknown: plans made ahead of it cannot run
    return r;
  }
  for (const auto& o : r->outputs)
    if (o.token >= 0)
      sampled_[o.id] = o.token;
  return r;
}

} // namespace troupe::engine
