#include "cluster/transfer/staging.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

namespace troupe::cluster::transfer {

expected<staging_buffer> staging_buffer::allocate(uint64_t bytes, bool pinned) {
  if (bytes == 0)
    return make_error(errc::invalid_argument, "a staging buffer of 0 bytes");
  staging_buffer b;
  if (pinned) {
    auto p = engine::cuda_alloc_host(bytes);
    if (!p)
      return std::move(p).error();
    b.data_ = static_cast<char*>(*p);
  } else {
    b.data_ = static_cast<char*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
    if (b.data_ == nullptr)
      return make_error(errc::resource_exhausted, "allocating a {}-byte staging buffer", bytes);
  }
  b.size_ = bytes;
  b.pinned_ = pinned;
  return b;
}

staging_buffer& staging_buffer::operator=(staging_buffer&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(pinned_, o.pinned_);
  return *this;
}

staging_buffer::~staging_buffer() {
  if (data_ == nullptr)
    return;
  if (pinned_)
    engine::cuda_free_host(data_);
  else
    std::free(data_);
}

void add_copy(std::vector<engine::copy_span>& out, void* dst, const void* src, uint64_t bytes) {
  if (bytes == 0)
    return;
  if (!out.empty()) {
    auto& last = out.back();
    if (static_cast<char*>(last.dst) + last.bytes == dst &&
        static_cast<const char*>(last.src) + last.bytes == src) {
      last.bytes += bytes;
      return;
    }
  }
  out.push_back({dst, src, bytes});
}

expected<void> copy_all(std::span<const engine::copy_span> copies, bool device) {
  if (device)
    return engine::cuda_copy_all(copies);
  for (const auto& c : copies)
    std::memcpy(c.dst, c.src, c.bytes);
  return {};
}

uint64_t stage_batch(write_batch& batch, std::span<const engine::kv_layout::allocation> sources,
                     char* at, region_id staged, uint64_t staged_offset,
                     std::vector<engine::copy_span>& copies) {
  uint64_t packed = 0;
  for (auto& r : batch.ranges) {
    add_copy(copies, at + packed, static_cast<const char*>(sources[r.local].base) + r.local_offset,
             r.length);
    r.local = 0;
    r.local_offset = staged_offset + packed;
    packed += r.length;
  }
  batch.locals = {staged};
  return packed;
}

parted_transfer::parted_transfer(kv_connection& conn, write_batch head, uint64_t chunk_bytes,
                                 std::optional<stage_area> stage)
  : conn_(conn), head_(std::move(head)), chunk_bytes_(std::max<uint64_t>(chunk_bytes, 1)),
    stage_(stage) {
  head_.ranges.clear();
}

expected<void> parted_transfer::drain(bool cancel) { // the silent chunks, in order
  error first;
  for (auto id : silent_) {
    if (cancel)
      conn_.cancel(id);
    auto r = conn_.wait(id);
    if (r) {
      out_.silent.bytes += r->bytes;
      out_.silent.posted_writes += r->posted_writes;
    } else if (first.code() == errc::ok) {
      first = std::move(r).error();
    }
  }
  silent_.clear();
  if (first.code() != errc::ok)
    return first;
  return {};
}

expected<void> parted_transfer::post(std::span<const write_range> ranges, bool last,
                                     const std::function<bool()>& cancelled) {
  size_t next = 0;
  do {
    if (cancelled()) {
      abort();
      return make_error(errc::cancelled, "cancelled while it was posted");
    }
    write_batch chunk{.lease_id = head_.lease_id,
                      .locals = head_.locals,
                      .remotes = head_.remotes,
                      .ranges = {},
                      .deadline = head_.deadline,
                      .notify = false};
    for (uint64_t bytes = 0; next < ranges.size() && bytes < chunk_bytes_; ++next) {
      bytes += ranges[next].length;
      chunk.ranges.push_back(ranges[next]);
    }
    if (stage_) {
      std::vector<engine::copy_span> copies;
      out_.staged += stage_batch(chunk, stage_->sources, stage_->at + out_.staged, stage_->staged,
                                 stage_->offset + out_.staged, copies);
      if (auto ok = copy_all(copies, stage_->device); !ok) {
        abort();
        return std::move(ok).error().context("staging KV out of the cache");
      }
    }
    const bool final = last && next == ranges.size();
    if (final) {
      if (auto ok = drain(false); !ok)
        return ok;
      chunk.notify = head_.notify;
    }
    auto posted = conn_.post(std::move(chunk));
    if (!posted) {
      abort();
      return std::move(posted).error();
    }
    if (final)
      out_.last = *posted;
    else
      silent_.push_back(*posted);
  } while (next < ranges.size());
  return {};
}

expected<staged_post> post_staged(kv_connection& conn, const write_batch& batch,
                                  const stage_area& area, uint64_t chunk_bytes,
                                  const std::function<bool()>& cancelled) {
  parted_transfer t(conn, batch, chunk_bytes, area);
  TROUPE_TRY_VOID(t.post(batch.ranges, true, cancelled));
  return t.result();
}

engine::kv_layout landing_layout(const engine::kv_layout& kv, int32_t blocks) {
  engine::kv_layout l = kv;
  l.num_blocks = blocks;
  const uint64_t plane = static_cast<uint64_t>(blocks) * kv.block_size * kv.token_bytes();
  l.planes.clear();
  for (int32_t i = 0; i < (kv.layer_end - kv.layer_begin) * 2; ++i)
    l.planes.push_back({.allocation = 0, .offset = static_cast<uint64_t>(i) * plane});
  l.allocations = {{.base = nullptr, .bytes = plane * l.planes.size(), .on_gpu = false}};
  return l;
}

expected<void> unstage_copies(const engine::kv_layout& landing, const char* landing_base,
                              const engine::kv_layout& kv, std::span<const int32_t> landing_blocks,
                              std::span<const int32_t> blocks, int32_t begin, int32_t end,
                              std::vector<engine::copy_span>& out) {
  const int32_t bs = kv.block_size;
  if (begin < 0 || end < begin)
    return make_error(errc::invalid_argument, "unstaging positions [{}, {})", begin, end);
  const auto need = static_cast<size_t>((end + bs - 1) / bs);
  if (landing.block_size != bs || landing_blocks.size() < need || blocks.size() < need)
    return make_error(errc::out_of_range,
                      "unstaging {} positions: {} landing and {} cache blocks of {} tokens", end,
                      landing_blocks.size(), blocks.size(), bs);
  for (int32_t layer = kv.layer_begin; layer < kv.layer_end; ++layer)
    for (int k = 0; k < 2; ++k) {
      const auto& lp = landing.plane_of(layer, k);
      const auto& cp = kv.plane_of(layer, k);
      char* cache = static_cast<char*>(kv.allocations[cp.allocation].base) + cp.offset;
      const char* from = landing_base + lp.offset;
      for (int32_t t = begin; t < end;) {
        const int32_t in = t % bs, n = std::min(bs - in, end - t);
        const int32_t lb = landing_blocks[static_cast<size_t>(t / bs)];
        const int32_t cb = blocks[static_cast<size_t>(t / bs)];
        if (lb < 0 || lb >= landing.num_blocks || cb < 0 || cb >= kv.num_blocks)
          return make_error(errc::out_of_range, "unstaging landing block {} -> cache block {}", lb,
                            cb);
        add_copy(out, cache + kv.at(cb, in, 0), from + landing.at(lb, in, 0),
                 static_cast<uint64_t>(n) * kv.token_bytes());
        t += n;
      }
    }
  return {};
}

std::optional<uint64_t> staging_ring::allocate(uint64_t bytes) {
  if (bytes == 0 || bytes > size_)
    return std::nullopt;
  uint64_t at = 0;
  if (!live_.empty()) {
    const uint64_t tail = live_.front().offset;
    const uint64_t head = live_.back().offset + live_.back().bytes;
    if (live_.back().offset >= tail) { // one run [tail, head): room after it, or before it
      if (size_ - head >= bytes)
        at = head;
      else if (tail >= bytes)
        at = 0;
      else
        return std::nullopt;
    } else { // wrapped: [tail, ...) and [0, head); room between
      if (tail - head < bytes)
        return std::nullopt;
      at = head;
    }
  }
  live_.push_back({at, bytes, false});
  return at;
}

void staging_ring::release(uint64_t offset) {
  for (auto& r : live_)
    if (r.offset == offset && !r.released) {
      r.released = true;
      break;
    }
  while (!live_.empty() && live_.front().released)
    live_.pop_front();
}

} // namespace troupe::cluster::transfer
