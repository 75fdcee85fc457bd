#include "engine/scheduler/engine_loop.hpp"

#include <algorithm>

#include "runtime/log.hpp"

namespace troupe::engine {

engine_loop::engine_loop(scheduler_options options, executor& exec)
  : engine_loop(std::move(options), exec.depth()) {
  exec_ = &exec;
}

engine_loop::engine_loop(scheduler_options options, int32_t depth) {
  const int32_t per_context =
      (options.max_model_len + options.block_size - 1) / std::max(options.block_size, 1);
  const int32_t fit = std::max(1, options.num_blocks / std::max(per_context, 1));
  const int32_t lanes = std::clamp(depth, 1, fit);
  if (lanes < depth)
    log::warn("engine: {} plan(s) in flight instead of {}: 1/{} of the {} KV blocks cannot hold "
              "a context of max_model_len {}; the executor will wait for scheduling",
              lanes, depth, depth, options.num_blocks, options.max_model_len);
  const int32_t slice = options.num_blocks / lanes;
  for (int32_t l = 0; l < lanes; ++l) {
    scheduler_options o = options;
    if (lanes > 1) {
      o.num_blocks = slice;
      o.block_offset = options.block_offset + l * slice;
      o.first_id = options.first_id + static_cast<seq_id>(l) * options.id_stride;
      o.id_stride = options.id_stride * static_cast<seq_id>(lanes);
      o.max_waiting = (options.max_waiting + lanes - 1) / lanes;
    }
    lanes_.push_back(std::make_unique<lane>(std::move(o)));
  }
}

engine_loop::lane& engine_loop::least_loaded() {
  auto load = [](const lane& l) {
    const auto s = l.sched.stats();
    return s.num_running + s.num_waiting;
  };
  lane* best = lanes_.front().get();
  for (const auto& l : lanes_)
    if (load(*l) < load(*best))
      best = l.get();
  return *best;
}

expected<seq_id> engine_loop::add_request(request r) {
  return least_loaded().sched.add(std::move(r));
}

expected<std::vector<seq_id>> engine_loop::add_group(std::vector<request> rs) {
  return least_loaded().sched.add_group(std::move(rs));
}

expected<void> engine_loop::cancel(seq_id id) {
  if (id == 0)
    return make_error(errc::not_found, "request {} is unknown or already finished", id);
  return lane_of(id).sched.cancel(id);
}

bool engine_loop::start(size_t i, std::vector<request_output>& out) {
  lane& l = *lanes_[i];
  if (l.busy)
    return false;
  l.sched.schedule(l.plan);
  if (l.plan.seqs.empty() && l.plan.finished.empty()) {
    l.sched.take_pending(out);
    return false;
  }
  l.busy = true;
  in_flight_.push_back(i);
  return true;
}

expected<std::vector<size_t>> engine_loop::plan(std::vector<request_output>& out) {
  if (failed_)
    return make_error(errc::unavailable, "a step failed; call fail_all() before planning again");
  std::vector<size_t> started;
  for (size_t i = 0; i < lanes_.size(); ++i)
    if (start(i, out)) {
      lanes_[i]->sched.fill_masks(lanes_[i]->plan); // the plan goes to the ranks as it is
      started.push_back(i);
    }
  return started;
}

expected<void> engine_loop::complete(size_t i, const step_result& result,
                                     std::vector<request_output>& out) {
  lane& l = *lanes_.at(i);
  auto it = std::find(in_flight_.begin(), in_flight_.end(), i);
  if (!l.busy || it == in_flight_.end())
    return make_error(errc::internal, "complete: lane {} has no plan in flight", i);
  in_flight_.erase(it);
  l.busy = false;
  if (auto u = l.sched.update(l.plan, result, out); !u) {
    failed_ = true;
    return std::move(u).error();
  }
  return {};
}

expected<std::vector<request_output>> engine_loop::step() {
  std::vector<request_output> out;
  if (failed_)
    return make_error(errc::unavailable, "a step failed; call fail_all() before stepping again");
  if (!exec_)
    return make_error(errc::internal, "step: this engine_loop has no executor");
  for (size_t i = 0; i < lanes_.size(); ++i) {
    if (!start(i, out))
      continue;
    lane& l = *lanes_[i];
    if (auto s = exec_->submit(l.plan, [&l] { l.sched.fill_masks(l.plan); }); !s) {
      in_flight_.pop_back(); // never submitted: nothing to collect
      lanes_[i]->busy = false;
      failed_ = true;
      return std::move(s).error().context(fmt::format("step {}", lanes_[i]->plan.step));
    }
  }
  if (in_flight_.empty())
    return out;
  const size_t i = in_flight_.front();
  auto result = exec_->collect();
  if (!result) {
    in_flight_.pop_front();
    lanes_[i]->busy = false;
    failed_ = true;
    return std::move(result).error().context(fmt::format("step {}", lanes_[i]->plan.step));
  }
  TROUPE_TRY_VOID(complete(i, *result, out));
  return out;
}

std::vector<request_output> engine_loop::fail_all() {
  for (; !in_flight_.empty(); in_flight_.pop_front()) {
    if (exec_)
      (void)exec_->collect(); // its requests are cancelled below; keeps the executor in step
    lanes_[in_flight_.front()]->busy = false;
  }
  std::vector<request_output> out;
  for (auto& l : lanes_) {
    for (seq_id id : l->sched.unfinished())
      (void)l->sched.cancel(id);
    l->sched.take_pending(out);
  }
  failed_ = false;
  return out;
}

bool engine_loop::has_unfinished() const {
  return std::any_of(lanes_.begin(), lanes_.end(),
                     [](const auto& l) { return l->sched.has_unfinished(); });
}

bool engine_loop::has_work() const {
  return std::any_of(lanes_.begin(), lanes_.end(),
                     [](const auto& l) { return l->sched.has_work(); });
}

void engine_loop::take_reservations(std::vector<kv_reservation>& out) {
  for (auto& l : lanes_)
    l->sched.take_reservations(out);
}

scheduler_stats engine_loop::stats() const {
  scheduler_stats sum;
  for (const auto& l : lanes_) {
    const auto s = l->sched.stats();
    sum.steps += s.steps;
    sum.preemptions += s.preemptions;
    sum.finished += s.finished;
    sum.prefix_hit_tokens += s.prefix_hit_tokens;
    sum.shared_prompt_tokens += s.shared_prompt_tokens;
    sum.constraint_violations += s.constraint_violations;
    sum.num_running += s.num_running;
    sum.num_waiting += s.num_waiting;
    sum.num_importing += s.num_importing;
    sum.num_held += s.num_held;
  }
  return sum;
}

pool_usage engine_loop::usage() const {
  pool_usage u;
  for (const auto& l : lanes_) {
    const auto& p = l->sched.pool();
    u += {p.num_blocks(), p.num_blocks() - p.num_free(), p.stats().lookups, p.stats().hits};
  }
  return u;
}

} // namespace troupe::engine
