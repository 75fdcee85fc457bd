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

// Where a transfer is staged: the buffer `at` (registered as `staged`, at `offset` in it) and the
// memory its ranges read (`sources`, the KV allocations; `device`: GPU memory).
struct stage_area {
  char* at = nullptr;
  region_id staged = 0;
  uint64_t offset = 0;
  std::span<const engine::kv_layout::allocation> sources;
  bool device = false;
};

// One transfer to one connection, posted in parts as they become ready (a layer at a time while
// the prefill computes the next), each part in chunks of about `chunk_bytes`; staged (the copy of
// a chunk runs while the one before it is on the wire) when given a stage_area. Every chunk but
// the last is silent; the last, with the transfer's one notice, is posted once the others
// completed, so the target hears of it only when everything landed. `head`: lease, locals,
// remotes and deadline (its ranges unused). Not thread-safe; post() blocks in waits for chunks.
struct staged_post {
  transfer_id last = 0;   // the notifying chunk, to wait for
  transfer_result silent; // what the silent chunks moved
  uint64_t staged = 0;    // staging bytes used
};
class parted_transfer {
 public:
  parted_transfer(kv_connection& conn, write_batch head, uint64_t chunk_bytes,
                  std::optional<stage_area> stage = std::nullopt);
  // Posts `ranges` (indexing the head's locals and remotes); `last`: the final part.
  // `cancelled` is asked between chunks. On failure the chunks posted so far are cancelled and
  // waited for (the provider reads none of our memory any more).
  expected<void> post(std::span<const write_range> ranges, bool last,
                      const std::function<bool()>& cancelled);
  // Ends a transfer that will get no last part: cancels and waits for the chunks posted.
  void abort() { (void)drain(true); }
  const staged_post& result() const { return out_; } // after the last part

 private:
  expected<void> drain(bool cancel);
  kv_connection& conn_;
  write_batch head_;
  uint64_t chunk_bytes_;
  std::optional<stage_area> stage_;
  std::vector<transfer_id> silent_;
  staged_post out_;
};

// `batch` as one part of a parted_transfer staged through `area`.
expected<staged_post> post_staged(kv_connection& conn, const write_batch& batch,
                                  const stage_area& area, uint64_t chunk_bytes,
                                  const std::function<bool()>& cancelled);

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
