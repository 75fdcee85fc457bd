// Turns a write_batch into the writes a transport posts: every range checked against its local and
// remote registration, contiguous ranges coalesced, and each write split to the provider's maximum.
// Pure and synchronous; called by fabric_transport and local_transport before anything is posted.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

struct planned_write {
  uint32_t local = 0; // index into write_batch::locals
  uint64_t local_offset = 0;
  uint32_t remote = 0; // index into write_batch::remotes
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

// `local_lengths[i]` is the registered length of batch.locals[i]. Zero-length ranges are dropped; a
// range outside its registration (or a bad index, or an offset overflow) fails the whole batch with
// errc::out_of_range / invalid_argument. `max_write` > 0 bounds each write (the provider's
// max_msg_size).
expected<std::vector<planned_write>>
plan_writes(const write_batch& batch, std::span<const uint64_t> local_lengths, uint64_t max_write);

uint64_t total_bytes(std::span<const planned_write> writes);

} // namespace troupe::cluster::transfer
