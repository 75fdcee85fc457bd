// An executor that keeps `depth` plans in flight around any other executor: submit() only
// queues, collect() runs the oldest, as a pipeline of `depth` stages returns them. Checks what
// plans in flight together must never share: a sequence or a KV block.
#pragma once

#include <deque>
#include <set>

#include <doctest/doctest.h>

#include "engine/exec/executor.hpp"

namespace troupe::test {

class pipelined_executor final : public engine::executor {
 public:
  pipelined_executor(engine::executor& inner, int32_t depth) : inner_(inner), depth_(depth) {}

  size_t max_in_flight = 0; // the most plans queued at once
  size_t conflicts = 0;     // plans in flight together that named the same sequence or block

  int32_t depth() const override { return depth_; }
  expected<step_result> execute(const step_plan& plan) override { return inner_.execute(plan); }
  expected<void> submit(const step_plan& plan, const mask_fill& fill) override {
    for (const auto& other : queue_)
      conflicts += overlap(*other.plan, plan);
    queue_.push_back({&plan, fill});
    max_in_flight = std::max(max_in_flight, queue_.size());
    return {};
  }
  expected<step_result> collect() override {
    REQUIRE_FALSE(queue_.empty());
    auto q = queue_.front();
    queue_.pop_front();
    return inner_.execute_filling(*q.plan, q.fill);
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
  struct queued {
    const step_plan* plan;
    mask_fill fill;
  };
  std::deque<queued> queue_;
};

} // namespace troupe::test
