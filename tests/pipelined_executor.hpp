// An executor that keeps `depth` plans in flight around any other executor: submit() only
// queues, collect() runs the oldest, as a pipeline of `depth` stages returns them. Checks what
// plans in flight together must never share: a sequence or a KV block. With `ahead` (depth 1,
// overlaps()), it runs as an executor on a thread of its own would, and engine_loop plans ahead:
// then a sequence in two plans in flight must continue in the later one where the earlier ends,
// feeding previous_sample if the earlier samples.
#pragma once

#include <deque>
#include <map>
#include <set>

#include <doctest/doctest.h>

#include "engine/exec/executor.hpp"

namespace troupe::test {

// Two plans in flight together, `later` made ahead of `earlier`: the sequences of `later` that do
// not continue where `earlier` ends them (feeding previous_sample when `earlier` samples);
// `continued` counts the sequences in both.
inline size_t broken_continuations(const step_plan& earlier, const step_plan& later,
                                   size_t& continued) {
  std::map<seq_id, const seq_step*> by_id;
  for (const auto& s : earlier.seqs)
    by_id[s.id] = &s;
  size_t n = 0;
  for (const auto& s : later.seqs) {
    auto it = by_id.find(s.id);
    if (it == by_id.end())
      continue;
    ++continued;
    const seq_step& e = *it->second;
    n += s.start_pos != e.start_pos + static_cast<int32_t>(e.tokens.size()) ||
         (e.logits != logits_mode::none && s.tokens != std::vector<token_id>{previous_sample});
  }
  return n;
}

class pipelined_executor final : public engine::executor {
 public:
  pipelined_executor(engine::executor& inner, int32_t depth, bool ahead = false)
    : inner_(inner), depth_(depth), ahead_(ahead) {}

  size_t max_in_flight = 0; // the most plans queued at once
  size_t conflicts = 0;     // plans in flight together that shared what they must not
  size_t continued = 0;     // ahead: sequences continued in a later plan in flight

  int32_t depth() const override { return depth_; }
  bool overlaps() const override { return ahead_; }
  expected<step_result> execute(const step_plan& plan) override { return inner_.execute(plan); }
  expected<void> submit(step_plan& plan, const mask_fill& fill) override {
    for (const auto& other : queue_)
      conflicts +=
          ahead_ ? broken_continuations(*other.plan, plan, continued) : overlap(*other.plan, plan);
    queue_.push_back({&plan, fill});
    max_in_flight = std::max(max_in_flight, queue_.size());
    return {};
  }
  expected<void> submit_unmasked(step_plan& plan) override { return submit(plan, {}); }
  expected<step_result> collect() override {
    REQUIRE_FALSE(queue_.empty());
    auto q = queue_.front();
    queue_.pop_front();
    return inner_.run(*q.plan, q.fill);
  }

 private:
  static bool overlap(const step_plan& a, const step_plan& b) {
    std::set<int64_t> ids, blocks;
    for (const auto& s : a.seqs) {
      ids.insert(static_cast<int64_t>(s.id));
      blocks.insert(s.block_table.begin(), s.block_table.end());
    }
    for (const auto& s : b.seqs) {
      if (ids.count(static_cast<int64_t>(s.id)))
        return true;
      for (int32_t blk : s.block_table)
        if (blocks.count(blk))
          return true;
    }
    return false;
  }
  engine::executor& inner_;
  int32_t depth_;
  bool ahead_;
  struct queued {
    step_plan* plan;
    mask_fill fill;
  };
  std::deque<queued> queue_;
};

} // namespace troupe::test
