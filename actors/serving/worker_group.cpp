#include "actors/serving/worker_group.hpp"

#include <fmt/format.h>

namespace troupe::serve {

uint64_t worker_group::start(uint64_t step) {
  const uint64_t ticket = next_ticket_++;
  auto& p = pending_[ticket];
  p.step = step;
  p.answered.assign(ranks_, false);
  return ticket;
}

auto worker_group::on_reply(int32_t rank, uint64_t ticket, const std::string& error,
                            step_result&& result) -> std::optional<outcome> {
  auto it = pending_.find(ticket);
  const auto r = static_cast<size_t>(rank);
  if (it == pending_.end() || rank < 0 || r >= ranks_ || it->second.answered[r])
    return std::nullopt;
  auto& p = it->second;
  p.answered[r] = true;
  ++p.got;
  if (!error.empty()) {
    auto err = make_error(errc::unavailable, "rank {} failed step {}: {}", rank, p.step, error);
    pending_.erase(it);
    return outcome{ticket, std::move(err)};
  }
  if (r == answer_rank_)
    p.result = std::move(result);
  if (p.got < ranks_)
    return std::nullopt;
  outcome out{ticket, std::move(p.result)};
  pending_.erase(it);
  return out;
}

std::string worker_group::missing(uint64_t ticket) const {
  auto it = pending_.find(ticket);
  if (it == pending_.end())
    return fmt::format("ticket {} is not pending", ticket);
  return fmt::format("{} of {} ranks did not answer step {}", ranks_ - it->second.got, ranks_,
                     it->second.step);
}

} // namespace troupe::serve
