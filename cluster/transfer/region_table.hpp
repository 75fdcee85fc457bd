// The memory regions a transport registered, each with how many transfers use it (a region in use
// cannot be deregistered). Shared by the socket and local transports; thread-safe, never blocks
// beyond its mutex.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

class region_table {
 public:
  // A new region whose descriptor's key is its id (with `ipc` when another process of this host
  // may map it). Errors: an empty region.
  expected<region_id> add(void* ptr, size_t length, memory_kind kind,
                          std::optional<cuda_ipc_part> ipc = {});
  // Errors: unknown id (not_found), or a transfer still uses it (invalid_argument).
  expected<void> remove(region_id id);
  expected<region_descriptor> describe(region_id id) const;
  size_t size() const;
  // Pins the regions for a batch (their in-use counts) and returns their descriptors.
  expected<std::vector<region_descriptor>> acquire(std::span<const region_id> ids);
  void release(std::span<const region_id> ids);
  // The live region with this key (the target side of a write), or not_found.
  expected<region_descriptor> find(uint64_t key) const;

 private:
  struct entry {
    region_descriptor desc;
    int in_use = 0;
  };
  mutable std::mutex mu_;
  std::map<region_id, entry> regions_;
  region_id next_id_ = 1;
};

} // namespace troupe::cluster::transfer
