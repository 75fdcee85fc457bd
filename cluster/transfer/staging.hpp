// KV staged through host memory (design.md §6), so that a transport registering host memory only
// (libfabric tcp, verbs without GPUDirect, sockets) still moves GPU KV. The prefill side copies a
// batch's ranges into a staging ring and writes from there; the decode side registers a landing
// area laid out like its KV cache (a few landing blocks) and, once a handoff has landed, copies
// its blocks into the cache. Page-locked memory and CUDA copies when the KV is on a GPU, plain
// memory and memcpy otherwise (`disaggregation.staging: always` stages host KV too). Plain and
// synchronous; the callers own the threads.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"
#include "engine/backend/cuda/cuda_device.hpp"
#include "engine/kv/kv_layout.hpp"
#include "runtime/error.hpp"

namespace troupe::cluster::transfer {

// Host memory to stage through: page-locked (cudaHostAlloc) when `pinned`, else plain.
class staging_buffer {
 public:
  static expected<staging_buffer> allocate(uint64_t bytes, bool pinned);
  staging_buffer(staging_buffer&& o) noexcept { *this = std::move(o); }
  staging_buffer& operator=(staging_buffer&& o) noexcept;
  ~staging_buffer();
  char* data() const { return data_; }
  uint64_t size() const { return size_; }
  bool pinned() const { return pinned_; }

 private:
  staging_buffer() = default;
  char* data_ = nullptr;
  uint64_t size_ = 0;
  bool pinned_ = false;
};

// Appends a copy, merged into the last one when it continues it on both sides.
void add_copy(std::vector<engine::copy_span>& out, void* dst, const void* src, uint64_t bytes);
// Runs the copies and waits for them: on a CUDA stream when `device` (a side is GPU memory),
// else with memcpy.
expected<void> copy_all(std::span<const engine::copy_span> copies, bool device);

// Stages `batch`, whose locals index `sources` (the KV allocations): its ranges are packed in
// order from `at` on, the copies that fill them appended to `copies`, and the batch now writes
// from the registration `staged` (at's). Returns the bytes staged.
uint64_t stage_batch(write_batch& batch, std::span<const engine::kv_layout::allocation> sources,
                     char* at, region_id staged, uint64_t staged_offset,
                     std::vector<engine::copy_span>& copies);

// Posts `batch` (locals: `sources`) through the staging buffer `at` (registered as `staged`, at
// `offset` in it), a chunk of about `chunk_bytes` at a time, so that the copy of a chunk runs
// while the one before it is on the wire. The chunks but the last are silent; the last (its
// notice) is posted once they completed. `cancelled` is asked between chunks. Returns the last
// chunk's id, to wait for, what the silent ones moved and the staging bytes used; on failure the
// posted chunks are cancelled and waited for (the provider reads no staging memory any more).
struct staged_post {
  transfer_id last = 0;
  transfer_result silent;
  uint64_t staged = 0;
};
expected<staged_post> post_staged(kv_connection& conn, const write_batch& batch,
                                  std::span<const engine::kv_layout::allocation> sources,
                                  bool device, char* at, region_id staged, uint64_t offset,
                                  uint64_t chunk_bytes, const std::function<bool()>& cancelled);

// The landing area for `blocks` blocks of `kv`'s shape: one allocation (base unset) holding every
// local (layer, K/V) plane in turn.
engine::kv_layout landing_layout(const engine::kv_layout& kv, int32_t blocks);

// The copies moving prompt positions [begin, end) from the landing area (`landing`, at
// `landing_base`) into the KV cache (`kv`, its allocations' bases set). Both block tables are
// indexed by position / block_size; entries before `begin`'s block are not read.
expected<void> unstage_copies(const engine::kv_layout& landing, const char* landing_base,
                              const engine::kv_layout& kv, std::span<const int32_t> landing_blocks,
                              std::span<const int32_t> blocks, int32_t begin, int32_t end,
                              std::vector<engine::copy_span>& out);

// Byte ranges of a staging buffer handed out in order and given back in any order; space is
// reused once everything handed out before it is back (a ring: transfers end mostly in order).
class staging_ring {
 public:
  explicit staging_ring(uint64_t size) : size_(size) {}
  // The offset of `bytes` (> 0) contiguous bytes, or nothing while the ring has no such room.
  std::optional<uint64_t> allocate(uint64_t bytes);
  void release(uint64_t offset);
  uint64_t size() const { return size_; }
  bool empty() const { return live_.empty(); }

 private:
  struct range {
    uint64_t offset = 0, bytes = 0;
    bool released = false;
  };
  uint64_t size_ = 0;
  std::deque<range> live_; // oldest first
};

} // namespace troupe::cluster::transfer
