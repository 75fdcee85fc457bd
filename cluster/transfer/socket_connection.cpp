#include "cluster/transfer/socket_connection.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "engine/backend/cuda/cuda_device.hpp"
#include "runtime/log.hpp"

namespace troupe::cluster::transfer::detail {
namespace {

constexpr size_t max_ranges = 512;                         // per segment (and per sendmsg/readv)
constexpr uint64_t max_segment_bytes = uint64_t{64} << 20; // cancel/deadline granularity
constexpr int poll_ms = 20;

} // namespace

socket_connection::socket_connection(std::shared_ptr<socket_transport> transport, int fd,
                                     std::string path)
  : transport_(std::move(transport)), fd_(fd), path_(std::move(path)),
    sender_([this] { send_loop(); }), reader_([this] { read_loop(); }) {}

socket_connection::~socket_connection() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  send_cv_.notify_all();
  shutdown(fd_, SHUT_RDWR);
  sender_.join();
  reader_.join();
  close(fd_);
  for (auto& [id, j] : jobs_)
    if (!j.done)
      transport_->release(j.batch.locals);
  for (auto& [handle, base] : mapped_)
    if (auto closed = engine::cuda_ipc_close(base); !closed)
      log::warn("transfer: {}: {}", path_, closed.error().to_string());
}

expected<transfer_id> socket_connection::post(write_batch batch) {
  auto acquired = transport_->acquire(batch.locals);
  if (!acquired)
    return std::move(acquired).error();
  std::vector<uint64_t> lengths;
  for (const auto& d : *acquired)
    lengths.push_back(d.length);
  auto writes = plan_writes(batch, lengths, max_segment_bytes);
  for (size_t i = 0; writes && i < writes->size(); ++i) { // GPU memory: written by CUDA IPC only
    const planned_write& w = (*writes)[i];
    const region_descriptor& to = batch.remotes[w.remote];
    if (auto ok = transport_->check_writable(to); !ok)
      writes = std::move(ok).error();
    else if ((*acquired)[w.local].kind == memory_kind::cuda && !to.ipc)
      writes = make_error(errc::unsupported,
                          "local region {} is GPU memory: the socket transport writes it into a "
                          "peer's GPU memory by CUDA IPC only, not into region {} ({})",
                          batch.locals[w.local], to.key, to_string(to.kind));
  }
  std::lock_guard lock(mu_);
  if (!writes || broken_) {
    transport_->release(batch.locals);
    if (!writes)
      return std::move(writes).error().context(fmt::format("lease {}", batch.lease_id));
    return make_error(errc::unavailable, "{}: connection closed: {}", path_, broken_.message());
  }
  transfer_id id = next_id_++;
  jobs_[id] = job{std::move(batch), std::move(*writes), std::move(*acquired)};
  queue_.push_back(id);
  send_cv_.notify_one();
  return id;
}

expected<transfer_result> socket_connection::wait(transfer_id id) {
  std::unique_lock lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end())
    return make_error(errc::not_found, "wait: no transfer {} on {}", id, path_);
  cv_.wait(lock, [&] { return it->second.done; });
  job j = std::move(it->second);
  jobs_.erase(it);
  if (j.failure)
    return std::move(j.failure);
  return transfer_result{j.bytes, j.segments};
}

void socket_connection::cancel(transfer_id id) {
  std::lock_guard lock(mu_);
  if (auto it = jobs_.find(id); it != jobs_.end())
    it->second.cancel = true;
}

expected<transfer_notice> socket_connection::wait_notice(clock::time_point deadline) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_until(lock, deadline, [&] { return !notices_.empty() || broken_; }))
    return make_error(errc::timeout, "no completion notice from {} before the deadline", path_);
  if (notices_.empty())
    return error{broken_.code(), broken_.message()};
  transfer_notice n = notices_.front();
  notices_.pop_front();
  return n;
}

void socket_connection::fail(error why) {
  if (broken_)
    return;
  if (!stop_)
    log::warn("transfer: {}", why.to_string());
  shutdown(fd_, SHUT_RDWR);
  for (auto& [id, j] : jobs_)
    if (!j.done && !j.sending) { // the one being sent is ended by send_loop
      j.done = true;
      j.failure = make_error(errc::unavailable, "lease {}: connection lost: {}", j.batch.lease_id,
                             why.message());
      transport_->release(j.batch.locals);
    }
  broken_ = std::move(why);
  cv_.notify_all();
  send_cv_.notify_all();
}

void socket_connection::send_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    send_cv_.wait(lock, [&] { return stop_ || broken_ || !queue_.empty(); });
    if (stop_ || broken_)
      return;
    transfer_id id = queue_.front();
    queue_.pop_front();
    job& j = jobs_[id];
    j.sending = true;
    send_job(j, lock);
    j.sending = false;
    if (!j.done) { // the connection broke while it was being sent
      j.done = true;
      j.failure = make_error(errc::unavailable, "lease {}: connection lost: {}", j.batch.lease_id,
                             broken_.message());
      transport_->release(j.batch.locals);
      cv_.notify_all();
    }
  }
}

// Segments of at most max_ranges writes / max_segment_bytes; cancel and deadline are looked at
// between segments (a clean stop: the peer gets a cancelled notice), and inside a segment by io_all
// (mid-segment the stream cannot be resynchronised, so the connection closes).
// A segment's writes go all into GPU memory by CUDA IPC (copied first, then sent as the table
// alone) or all over the socket; a failed copy ends the batch like a cancel, with its error.
void socket_connection::send_job(job& j, std::unique_lock<std::mutex>& lock) {
  size_t next = 0;
  const uint32_t silent = j.batch.notify ? 0 : flag_silent;
  auto by_ipc = [&](size_t i) { return j.batch.remotes[j.writes[i].remote].ipc.has_value(); };
  error copy_failed;
  while (!j.done) {
    bool late = clock::now() >= j.batch.deadline;
    if (j.cancel || late || copy_failed) {
      lock.unlock();
      auto sent = send_segment(j, next, 0, flag_last | flag_cancelled | silent);
      lock.lock();
      if (!sent)
        return fail(std::move(sent).error());
      j.failure = copy_failed ? std::move(copy_failed)
                  : late ? make_error(errc::timeout, "lease {}: deadline passed after {} bytes",
                                      j.batch.lease_id, j.bytes)
                         : make_error(errc::cancelled, "lease {}: cancelled after {} bytes",
                                      j.batch.lease_id, j.bytes);
      break;
    }
    size_t count = 0;
    uint64_t bytes = 0;
    while (next + count < j.writes.size() && count < max_ranges &&
           (count == 0 || (bytes + j.writes[next + count].length <= max_segment_bytes &&
                           by_ipc(next + count) == by_ipc(next))))
      bytes += j.writes[next + count++].length;
    bool last = next + count == j.writes.size();
    const uint32_t written = count > 0 && by_ipc(next) ? flag_written : 0;
    lock.unlock();
    if (written) {
      auto copied = copy_by_ipc(j, next, count);
      if (!copied) {
        lock.lock();
        copy_failed = std::move(copied).error().context(
            fmt::format("lease {}: CUDA IPC copy after {} bytes", j.batch.lease_id, j.bytes));
        continue;
      }
    }
    auto sent = send_segment(j, next, count, (last ? flag_last | silent : 0) | written);
    lock.lock();
    if (!sent) {
      error why = std::move(sent).error();
      if (why.code() == errc::timeout) { // this batch reports the deadline, the others the loss
        j.done = true;
        j.failure = error{why.code(), why.message()};
        transport_->release(j.batch.locals);
      }
      return fail(std::move(why));
    }
    j.bytes += bytes;
    next += count;
    if (last)
      break;
  }
  j.done = true;
  transport_->release(j.batch.locals);
  cv_.notify_all();
}

expected<void> socket_connection::send_segment(job& j, size_t first, size_t count, uint32_t flags) {
  segment_header h{segment_magic, flags, j.batch.lease_id, count};
  std::vector<wire_range> table(count);
  std::vector<iovec> iov;
  iov.reserve(count + 2);
  iov.push_back({&h, sizeof h});
  if (count > 0)
    iov.push_back({table.data(), count * sizeof(wire_range)});
  for (size_t i = 0; i < count; ++i) {
    const planned_write& w = j.writes[first + i];
    table[i] = {j.batch.remotes[w.remote].key, w.remote_offset, w.length};
    if (!(flags & flag_written))
      iov.push_back({reinterpret_cast<char*>(j.locals[w.local].addr) + w.local_offset, w.length});
  }
  ++j.segments;
  return io_all(true, iov.data(), static_cast<int>(iov.size()), j.batch.deadline);
}

expected<char*> socket_connection::mapped(const cuda_ipc_part& remote,
                                          const region_descriptor& local) {
  if (auto it = mapped_.find(remote.handle); it != mapped_.end())
    return it->second;
  // On the device the copies read from (GPU memory), else the thread's current one.
  auto base = engine::cuda_ipc_open(remote.handle, local.ipc ? local.ipc->device : -1);
  if (!base)
    return std::move(base).error().context(
        fmt::format("{}: mapping the peer's GPU memory (its device {})", path_, remote.device));
  return mapped_[remote.handle] = static_cast<char*>(*base);
}

expected<void> socket_connection::copy_by_ipc(job& j, size_t first, size_t count) {
  std::vector<engine::copy_span> copies;
  copies.reserve(count);
  for (size_t i = first; i < first + count; ++i) {
    const planned_write& w = j.writes[i];
    const region_descriptor &to = j.batch.remotes[w.remote], &from = j.locals[w.local];
    char* dst = reinterpret_cast<char*>(to.addr) + w.remote_offset; // in this process: as is
    if (!socket_transport::exported_here(to.ipc->handle)) {
      char* base = nullptr;
      TROUPE_ASSIGN(base, mapped(*to.ipc, from));
      dst = base + to.ipc->offset + w.remote_offset;
    }
    copies.push_back({dst, reinterpret_cast<const char*>(from.addr) + w.local_offset, w.length});
  }
  return engine::cuda_copy_all(copies);
}

// sendmsg/readv until every iovec is done, polling in short steps so stop, peer loss and the
// deadline are noticed.
expected<void> socket_connection::io_all(bool sending, iovec* iov, int count,
                                         clock::time_point deadline) {
  while (count > 0) {
    ssize_t n = 0;
    if (sending) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(std::min(count, 1024));
      n = sendmsg(fd_, &msg, MSG_NOSIGNAL);
    } else {
      n = readv(fd_, iov, std::min(count, 1024));
    }
    if (n == 0 && !sending)
      return make_error(errc::unavailable, "{}: the peer closed the connection", path_);
    if (n < 0 && errno != EAGAIN && errno != EINTR)
      return make_error(errc::unavailable, "{}: {}", path_, std::strerror(errno));
    if (n < 0) {
      if (clock::now() >= deadline)
        return make_error(errc::timeout, "{}: deadline passed inside a segment", path_);
      pollfd pfd{fd_, static_cast<short>(sending ? POLLOUT : POLLIN), 0};
      poll(&pfd, 1, poll_ms);
      std::lock_guard lock(mu_);
      if (stop_ || broken_)
        return make_error(errc::cancelled, "{}: connection closing", path_);
      continue;
    }
    while (count > 0 && static_cast<size_t>(n) >= iov->iov_len) {
      n -= static_cast<ssize_t>(iov->iov_len);
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + n;
      iov->iov_len -= static_cast<size_t>(n);
    }
  }
  return {};
}

void socket_connection::read_loop() {
  for (;;) {
    auto got = read_segment();
    std::lock_guard lock(mu_);
    if (stop_)
      return;
    if (!got)
      return fail(std::move(got).error());
  }
}

expected<void> socket_connection::read_segment() {
  const auto forever = clock::time_point::max();
  segment_header h;
  iovec hv{&h, sizeof h};
  TROUPE_TRY_VOID(io_all(false, &hv, 1, forever));
  if (h.magic != segment_magic || h.ranges > max_ranges || (h.flags & ~known_flags) != 0)
    return make_error(errc::parse_error, "{}: not a transfer segment", path_);
  std::vector<wire_range> table(h.ranges);
  std::vector<iovec> iov;
  if (h.ranges > 0) {
    iovec tv{table.data(), h.ranges * sizeof(wire_range)};
    TROUPE_TRY_VOID(io_all(false, &tv, 1, forever));
  }
  uint64_t bytes = 0;
  for (const wire_range& r : table) { // checked again here: the peer's descriptor may be stale
    char* dst = nullptr;
    TROUPE_ASSIGN(dst, transport_->target_range(r.key, r.offset, r.length));
    iov.push_back({dst, r.length});
    bytes += r.length;
  }
  if (!iov.empty() && !(h.flags & flag_written)) // written: by the peer, through CUDA IPC
    TROUPE_TRY_VOID(io_all(false, iov.data(), static_cast<int>(iov.size()), forever));
  std::lock_guard lock(mu_);
  uint64_t& total = incoming_bytes_[h.lease_id];
  total += bytes;
  if (h.flags & flag_last) {
    if (!(h.flags & flag_silent))
      notices_.push_back({h.lease_id, total, (h.flags & flag_cancelled) != 0});
    incoming_bytes_.erase(h.lease_id);
    cv_.notify_all();
  }
  return {};
}

} // namespace troupe::cluster::transfer::detail
