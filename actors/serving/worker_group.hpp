// One replica's worker ranks as its replica actor sees them: the tickets of the plans sent to
// every rank and the gathering of their replies (the last stage's tensor rank 0 carries the
// result; the other ranks only report success). Plain C++: the replica actor does the messaging.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::serve {

class worker_group {
 public:
  worker_group(size_t ranks, size_t answer_rank) : ranks_(ranks), answer_rank_(answer_rank) {}

  // A plan numbered `step` goes to every rank: its ticket.
  uint64_t start(uint64_t step);

  struct outcome {
    uint64_t ticket = 0;
    expected<step_result> result; // an error names the rank and the step
  };
  // Rank `rank`'s reply to `ticket` (`error` empty: ok). The ticket's outcome once every rank
  // answered, or at its first error; nullopt while answers are missing or for a ticket no
  // longer pending (a late answer).
  std::optional<outcome> on_reply(int32_t rank, uint64_t ticket, const std::string& error,
                                  step_result&& result);

  bool pending(uint64_t ticket) const { return pending_.count(ticket) > 0; }
  size_t in_flight() const { return pending_.size(); }
  // "2 of 3 ranks did not answer step 7": why `ticket` is late.
  std::string missing(uint64_t ticket) const;
  void clear() { pending_.clear(); }

 private:
  struct replies {
    uint64_t step = 0;
    std::vector<bool> answered;
    size_t got = 0;
    step_result result;
  };
  size_t ranks_, answer_rank_;
  uint64_t next_ticket_ = 1;
  std::map<uint64_t, replies> pending_; // by ticket
};

} // namespace troupe::serve
