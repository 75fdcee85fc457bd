#include "engine/scheduler/engine_loop.hpp"

#include <algorithm>
#include <chrono>

#include "runtime/log.hpp"

namespace troupe::engine {

engine_loop::engine_loop(scheduler_options options, executor& exec)
  : engine_loop(std::move(options), exec.depth(), exec.overlaps()) {
  exec_ = &exec;
}

engine_loop::engine_loop(scheduler_options options, int32_t depth, bool plan_ahead)
  : plan_ahead_(plan_ahead && depth == 1) {
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
  if (l.busy >= (plan_ahead_ ? 2u : 1u) || (l.busy && !l.sched.can_plan_ahead(masks_later())))
    return false;
  step_plan& p = l.at(l.busy);
  l.sched.schedule(p);
  if (p.seqs.empty() && p.finished.empty()) {
    l.sched.take_pending(out);
    return false;
  }
  ++l.busy;
  in_flight_.push_back(i);
  return true;
}

void engine_loop::finish_oldest(lane& l) {
  l.first = (l.first + 1) % l.plans.size();
  --l.busy;
}

error engine_loop::drop_newest(lane& l, error why) {
  const uint64_t step = l.at(l.busy - 1).step;
  if (l.unmasked == &l.at(l.busy - 1))
    l.unmasked = nullptr;
  in_flight_.pop_back();
  --l.busy;
  failed_ = true;
  return std::move(why).context(fmt::format("step {}", step));
}

void engine_loop::fill_unmasked(lane& l, bool fill) {
  if (!l.unmasked || !l.busy || l.unmasked != &l.at(0))
    return;
  step_plan& p = l.at(0);
  if (fill)
    l.sched.fill_masks(p);
  exec_->masks_filled(p);
  l.unmasked = nullptr;
}

expected<std::vector<engine_loop::started>> engine_loop::plan(std::vector<request_output>& out) {
  if (failed_)
    return make_error(errc::unavailable, "a step failed; call fail_all() before planning again");
  std::vector<started> s;
  for (size_t i = 0; i < lanes_.size(); ++i)
    while (start(i, out)) {
      lane& l = *lanes_[i];
      step_plan& p = l.at(l.busy - 1);
      l.sched.fill_masks(p); // the plan goes to the ranks as it is
      s.push_back({i, &p});
    }
  return s;
}

expected<void> engine_loop::complete(size_t i, const step_result& result,
                                     std::vector<request_output>& out) {
  lane& l = *lanes_.at(i);
  auto it = std::find(in_flight_.begin(), in_flight_.end(), i);
  if (!l.busy || it == in_flight_.end())
    return make_error(errc::internal, "complete: lane {} has no plan in flight", i);
  in_flight_.erase(it);
  const step_plan& p = l.at(0);
  finish_oldest(l); // p stays intact until this lane plans again
  if (auto u = l.sched.update(p, result, out); !u) {
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
  for (size_t i = 0; i < lanes_.size(); ++i)
    while (start(i, out)) {
      lane& l = *lanes_[i];
      step_plan& p = l.at(l.busy - 1);
      const auto fill = [&l, &p] { l.sched.fill_masks(p); };
      // Nothing else in flight and nothing to plan ahead of it (it scores a prompt): run it on
      // this thread rather than hand it to the executor's and wait.
      if (plan_ahead_ && in_flight_.size() == 1 && !l.sched.can_plan_ahead(masks_later())) {
        auto result = exec_->run_here(p, fill);
        if (!result)
          return drop_newest(l, std::move(result).error());
        TROUPE_TRY_VOID(complete(i, *result, out));
        return out;
      }
      // Made ahead under a grammar: its masks wait until the plan before is updated.
      const bool later = l.busy > 1 && l.sched.constrained(p);
      if (later)
        l.unmasked = &p;
      if (auto s = later ? exec_->submit_unmasked(p) : exec_->submit(p, fill); !s)
        return drop_newest(l, std::move(s).error()); // never submitted: nothing to collect
    }
  if (in_flight_.empty())
    return out;
  const size_t i = in_flight_.front();
  const bool timed = log::threshold() <= log::level::debug;
  const auto t0 =
      timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  auto result = exec_->collect();
  if (timed) {
    const step_plan& p = lanes_[i]->at(0);
    log::debug(
        "engine: step {} ({} sequences, {} tokens) collected after {:.0f} us", p.step,
        p.seqs.size(), p.num_tokens(),
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!result) {
    in_flight_.pop_front();
    const uint64_t step = lanes_[i]->at(0).step;
    finish_oldest(*lanes_[i]);
    failed_ = true;
    return std::move(result).error().context(fmt::format("step {}", step));
  }
  TROUPE_TRY_VOID(complete(i, *result, out));
  fill_unmasked(*lanes_[i], true); // while its forward pass runs
  return out;
}

std::vector<request_output> engine_loop::fail_all() {
  for (; !in_flight_.empty(); in_flight_.pop_front()) {
    lane& l = *lanes_[in_flight_.front()];
    if (exec_) {
      fill_unmasked(l, false); // sampled without masks: its results are dropped
      (void)exec_->collect();  // its requests are cancelled below; keeps the executor in step
    }
    finish_oldest(l);
  }
  std::vector<request_output> out;
  for (auto& l : lanes_) {
    l->sched.forget_outstanding();
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
  return !in_flight_.empty() || std::any_of(lanes_.begin(), lanes_.end(),
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
