#include "cluster/transfer/write_plan.hpp"

#include <algorithm>
#include <numeric>
#include <tuple>

namespace troupe::cluster::transfer {
namespace {

bool within(uint64_t offset, uint64_t length, uint64_t limit) {
  return offset <= limit && length <= limit - offset; // no overflow for any offset/length
}

expected<void> check_range(const write_batch& batch, std::span<const uint64_t> local_lengths,
                           size_t index) {
  const write_range& r = batch.ranges[index];
  if (r.local >= batch.locals.size() || r.local >= local_lengths.size())
    return make_error(errc::invalid_argument, "range {}: local region index {} of {}", index,
                      r.local, batch.locals.size());
  if (r.remote >= batch.remotes.size())
    return make_error(errc::invalid_argument, "range {}: remote region index {} of {}", index,
                      r.remote, batch.remotes.size());
  if (!within(r.local_offset, r.length, local_lengths[r.local]))
    return make_error(errc::out_of_range,
                      "range {}: local [{}, +{}) outside its registration of {} bytes", index,
                      r.local_offset, r.length, local_lengths[r.local]);
  if (!within(r.remote_offset, r.length, batch.remotes[r.remote].length))
    return make_error(errc::out_of_range,
                      "range {}: remote [{}, +{}) outside the peer's registration of {} bytes",
                      index, r.remote_offset, r.length, batch.remotes[r.remote].length);
  return {};
}

} // namespace

expected<std::vector<planned_write>>
plan_writes(const write_batch& batch, std::span<const uint64_t> local_lengths, uint64_t max_write) {
  if (max_write == 0)
    return make_error(errc::invalid_argument, "plan_writes: max_write is 0");
  std::vector<size_t> order;
  order.reserve(batch.ranges.size());
  for (size_t i = 0; i < batch.ranges.size(); ++i) {
    TROUPE_TRY_VOID(check_range(batch, local_lengths, i));
    if (batch.ranges[i].length > 0)
      order.push_back(i);
  }
  // Writes within a batch are unordered, so sorting by source lets neighbours merge.
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const write_range &x = batch.ranges[a], &y = batch.ranges[b];
    return std::tie(x.local, x.remote, x.local_offset, x.remote_offset) <
           std::tie(y.local, y.remote, y.local_offset, y.remote_offset);
  });
  std::vector<planned_write> merged;
  for (size_t i : order) {
    const write_range& r = batch.ranges[i];
    if (!merged.empty()) {
      planned_write& last = merged.back();
      if (last.local == r.local && last.remote == r.remote &&
          last.local_offset + last.length == r.local_offset &&
          last.remote_offset + last.length == r.remote_offset) {
        last.length += r.length;
        continue;
      }
    }
    merged.push_back({r.local, r.local_offset, r.remote, r.remote_offset, r.length});
  }
  std::vector<planned_write> out;
  out.reserve(merged.size());
  for (const planned_write& w : merged) {
    for (uint64_t done = 0; done < w.length; done += max_write) {
      uint64_t n = std::min(max_write, w.length - done);
      out.push_back({w.local, w.local_offset + done, w.remote, w.remote_offset + done, n});
    }
  }
  return out;
}

uint64_t total_bytes(std::span<const planned_write> writes) {
  return std::accumulate(writes.begin(), writes.end(), uint64_t{0},
                         [](uint64_t sum, const planned_write& w) { return sum + w.length; });
}

} // namespace troupe::cluster::transfer
