// Same-process transport: writes are memcpy (host) or batched CUDA copies (GPU memory, when built
// with CUDA), on a worker thread per connection so post() never blocks. Used by co-located
// prefill/decode ranks and as the reference the fabric transport is tested against.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "cluster/transfer/kv_transport.hpp"
#include "cluster/transfer/region_table.hpp"

namespace troupe::cluster::transfer {

class local_transport final : public kv_transport {
 public:
  std::string name() const override { return "local"; }
  expected<region_id> register_memory(void* ptr, size_t length, memory_kind kind) override;
  expected<void> deregister(region_id id) override { return regions_.remove(id); }
  expected<region_descriptor> describe(region_id id) const override {
    return regions_.describe(id);
  }
  size_t registration_count() const override { return regions_.size(); }

  // Two connected ends: writes posted on `first` land in `b`'s registrations and notify `second`.
  static std::pair<std::unique_ptr<kv_connection>, std::unique_ptr<kv_connection>>
  connect_pair(std::shared_ptr<local_transport> a, std::shared_ptr<local_transport> b,
               uint64_t max_write = uint64_t{64} << 20);

  // For a connection: pins the regions (in-use count) or checks a descriptor names a live one.
  expected<std::vector<region_descriptor>> acquire(std::span<const region_id> ids) {
    return regions_.acquire(ids);
  }
  void release(std::span<const region_id> ids) { regions_.release(ids); }
  expected<void> check_live(const region_descriptor& d) const;

 private:
  region_table regions_;
};

} // namespace troupe::cluster::transfer
