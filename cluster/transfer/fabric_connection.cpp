#include "cluster/transfer/fabric_connection.hpp"

#include <algorithm>
#include <cstring>

#include <rdma/fi_cm.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include "runtime/log.hpp"

namespace troupe::cluster::transfer::detail {
namespace {
constexpr uint32_t notice_magic = 0x4e4b5654; // "TVKN"
constexpr int max_sread_ms = 20;              // how often the EQ (peer shutdown) is looked at
} // namespace

fabric_connection::fabric_connection(std::shared_ptr<fabric_domain> domain, parts p,
                                     std::string path, uint64_t max_write)
  : domain_(std::move(domain)), parts_(std::move(p)), path_(std::move(path)),
    max_write_(max_write) {
  size_t tx_size = domain_->info->tx_attr ? domain_->info->tx_attr->size : 0;
  tx_depth_ = std::max<size_t>(4, tx_size == 0 ? 64 : tx_size);
  virt_addr_ = (domain_->info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0;
  for (uint32_t s = 0; s < send_slots; ++s)
    free_send_slots_.push_back(static_cast<uint32_t>(recv_slots + s));
  std::unique_lock lock(mu_);
  for (uint32_t s = 0; s < recv_slots; ++s)
    if (auto posted = post_recv(s); !posted) {
      broken_ = std::move(posted).error();
      break;
    }
  lock.unlock();
  thread_ = std::thread([this] { progress_loop(); });
}

fabric_connection::~fabric_connection() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    if (parts_.cq)
      fi_cq_signal(parts_.cq.get());
  }
  cv_.notify_all();
  thread_.join();
  // Endpoint first (flushes everything posted), then what it was bound to, then the notice memory.
  parts_.ep.reset();
  parts_.cq.reset();
  parts_.eq.reset();
  parts_.notice_mr.reset();
  for (auto& [id, b] : batches_)
    if (!b.done)
      domain_->release(b.batch.locals);
}

fabric_connection::op_context* fabric_connection::context_for(op_context::kind_t kind,
                                                              transfer_id id, uint32_t slot,
                                                              uint64_t length) {
  op_context* c = nullptr;
  if (free_contexts_.empty()) {
    c = &contexts_.emplace_back();
  } else {
    c = free_contexts_.back();
    free_contexts_.pop_back();
  }
  std::memset(&c->ctx, 0, sizeof c->ctx);
  c->kind = kind;
  c->id = id;
  c->slot = slot;
  c->length = length;
  return c;
}

expected<void> fabric_connection::post_recv(uint32_t slot) {
  op_context* c = context_for(op_context::recv, 0, slot, 0);
  ssize_t rc = fi_recv(parts_.ep.get(), &parts_.notice_buffers[slot], sizeof(notice_wire),
                       fi_mr_desc(parts_.notice_mr.get()), 0, c);
  if (rc != 0) {
    free_context(c);
    return fi_error(errc::unavailable, "fi_recv (notice buffer)", static_cast<int>(rc));
  }
  return {};
}

expected<transfer_id> fabric_connection::post(write_batch batch) {
  std::vector<uint64_t> lengths;
  auto locals = domain_->acquire(batch.locals);
  if (!locals)
    return std::move(locals).error();
  for (const resolved_region& r : *locals)
    lengths.push_back(r.length);
  auto writes = plan_writes(batch, lengths, max_write_);
  std::lock_guard lock(mu_);
  if (!writes || broken_) {
    domain_->release(batch.locals);
    if (!writes)
      return std::move(writes).error().context(fmt::format("lease {}", batch.lease_id));
    return make_error(errc::unavailable, "{}: connection closed: {}", path_, broken_.message());
  }
  transfer_id id = next_id_++;
  batch_state& b = batches_[id];
  b.batch = std::move(batch);
  b.writes = std::move(*writes);
  b.locals = std::move(*locals);
  fi_cq_signal(parts_.cq.get()); // wake the progress thread to post
  return id;
}

expected<transfer_result> fabric_connection::wait(transfer_id id) {
  std::unique_lock lock(mu_);
  auto it = batches_.find(id);
  if (it == batches_.end())
    return make_error(errc::not_found, "wait: no transfer {} on {}", id, path_);
  cv_.wait(lock, [&] { return it->second.done; });
  batch_state b = std::move(it->second);
  batches_.erase(it);
  if (b.failure)
    return std::move(b.failure);
  return transfer_result{b.bytes, b.writes.size()};
}

void fabric_connection::cancel(transfer_id id) {
  std::lock_guard lock(mu_);
  if (auto it = batches_.find(id); it != batches_.end() && !it->second.done) {
    it->second.cancel = true;
    if (parts_.cq)
      fi_cq_signal(parts_.cq.get());
  }
}

expected<transfer_notice> fabric_connection::wait_notice(clock::time_point deadline) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_until(lock, deadline, [&] { return !notices_.empty() || broken_; }))
    return make_error(errc::timeout, "no completion notice from {} before the deadline", path_);
  if (notices_.empty())
    return error{broken_.code(), broken_.message()};
  transfer_notice n = notices_.front();
  notices_.pop_front();
  return n;
}

void fabric_connection::progress_loop() {
  std::unique_lock lock(mu_);
  fi_cq_msg_entry entries[32];
  while (!stop_) {
    if (broken_) {
      cv_.wait(lock, [&] { return stop_; });
      break;
    }
    check_deadlines(); // first: an expired batch must not get writes posted
    if (!broken_)
      post_pending(lock);
    if (broken_)
      continue;
    fid_cq* cq = parts_.cq.get();
    int timeout = sread_timeout_ms();
    lock.unlock();
    ssize_t n = fi_cq_sread(cq, entries, 32, nullptr, timeout);
    lock.lock();
    if (stop_)
      break;
    for (ssize_t i = 0; i < n; ++i)
      handle_completion(entries[i]);
    if (n == -FI_EAVAIL)
      read_cq_error();
    else if (n < 0 && n != -FI_EAGAIN && n != -FI_ECANCELED && n != -FI_ETIMEDOUT)
      fail_connection(fi_error(errc::unavailable, "fi_cq_sread", static_cast<int>(n)));
    if (!broken_)
      check_events();
  }
}

int fabric_connection::sread_timeout_ms() const {
  auto now = clock::now();
  auto nearest = now + std::chrono::milliseconds(max_sread_ms);
  for (const auto& [id, b] : batches_)
    if (!b.done)
      nearest = std::min(nearest, b.batch.deadline);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(nearest - now).count();
  return static_cast<int>(std::clamp<int64_t>(ms + 1, 1, max_sread_ms));
}

void fabric_connection::post_pending(std::unique_lock<std::mutex>&) {
  for (auto& [id, b] : batches_) {
    if (b.done)
      continue;
    if (b.cancel)
      b.next = b.writes.size(); // posted writes still complete; nothing new goes out
    while (b.next < b.writes.size() && tx_outstanding_ < tx_depth_) {
      if (int rc = post_one_write(b, id); rc == -FI_EAGAIN)
        return;
      else if (rc != 0)
        return fail_connection(fi_error(errc::unavailable, "fi_write", rc));
    }
    if (b.next == b.writes.size() && b.outstanding == 0 && !b.notice_posted && !b.batch.notify) {
      b.notice_posted = true; // a silent batch ends with its writes
      finish(id, b,
             b.cancel ? make_error(errc::cancelled, "lease {}: cancelled after {} bytes",
                                   b.batch.lease_id, b.bytes)
                      : error{});
    }
    if (b.next == b.writes.size() && b.outstanding == 0 && !b.notice_posted) {
      if (free_send_slots_.empty() || tx_outstanding_ >= tx_depth_)
        return;
      if (int rc = post_notice(b, id); rc == -FI_EAGAIN)
        return;
      else if (rc != 0)
        return fail_connection(fi_error(errc::unavailable, "fi_send (completion notice)", rc));
    }
    if (b.next < b.writes.size())
      return; // keep batches in order: a later batch starts once this one is fully posted
  }
}

int fabric_connection::post_one_write(batch_state& b, transfer_id id) {
  const planned_write& w = b.writes[b.next];
  const resolved_region& local = b.locals[w.local];
  const region_descriptor& remote = b.batch.remotes[w.remote];
  op_context* c = context_for(op_context::write, id, 0, w.length);
  // Without FI_MR_VIRT_ADDR (e.g. tcp) the target address is an offset into the registration.
  uint64_t target = virt_addr_ ? remote.addr + w.remote_offset : w.remote_offset;
  ssize_t rc = fi_write(parts_.ep.get(), local.base + w.local_offset, w.length, local.desc, 0,
                        target, remote.key, c);
  if (rc != 0) {
    free_context(c);
    return static_cast<int>(rc);
  }
  ++b.next;
  ++b.outstanding;
  ++tx_outstanding_;
  return 0;
}

int fabric_connection::post_notice(batch_state& b, transfer_id id) {
  uint32_t slot = free_send_slots_.back();
  notice_wire& wire = parts_.notice_buffers[slot];
  wire = {notice_magic, b.cancel ? 1u : 0u, b.batch.lease_id, b.bytes};
  op_context* c = context_for(op_context::send, id, slot, 0);
  ssize_t rc =
      fi_send(parts_.ep.get(), &wire, sizeof wire, fi_mr_desc(parts_.notice_mr.get()), 0, c);
  if (rc != 0) {
    free_context(c);
    return static_cast<int>(rc);
  }
  free_send_slots_.pop_back();
  b.notice_posted = true;
  ++b.outstanding;
  ++tx_outstanding_;
  return 0;
}

void fabric_connection::handle_completion(const fi_cq_msg_entry& entry) {
  auto* c = static_cast<op_context*>(entry.op_context);
  op_context done = *c;
  free_context(c);
  if (done.kind == op_context::recv) {
    const notice_wire& wire = parts_.notice_buffers[done.slot];
    if (wire.magic == notice_magic)
      notices_.push_back({wire.lease_id, wire.bytes, wire.cancelled != 0});
    else
      log::warn("transfer: {}: dropped a message that is no completion notice", path_);
    cv_.notify_all();
    if (auto posted = post_recv(done.slot); !posted)
      fail_connection(std::move(posted).error());
    return;
  }
  --tx_outstanding_;
  auto it = batches_.find(done.id);
  if (it == batches_.end())
    return;
  batch_state& b = it->second;
  --b.outstanding;
  if (done.kind == op_context::write) {
    b.bytes += done.length;
  } else {
    free_send_slots_.push_back(done.slot);
    finish(done.id, b,
           b.cancel ? make_error(errc::cancelled, "lease {}: cancelled after {} bytes",
                                 b.batch.lease_id, b.bytes)
                    : error{});
  }
}

void fabric_connection::read_cq_error() {
  fi_cq_err_entry err{};
  if (fi_cq_readerr(parts_.cq.get(), &err, 0) <= 0)
    return;
  auto* c = static_cast<op_context*>(err.op_context);
  if (c && c->kind == op_context::recv && err.err == FI_ECANCELED)
    return fail_connection(make_error(errc::unavailable, "{}: the connection was closed", path_));
  char buf[256] = {0};
  const char* detail = err.prov_errno == 0 ? nullptr
                                           : fi_cq_strerror(parts_.cq.get(), err.prov_errno,
                                                            err.err_data, buf, sizeof buf);
  const char* what = !c                             ? "operation"
                     : c->kind == op_context::write ? "write"
                     : c->kind == op_context::send  ? "notice send"
                                                    : "notice receive";
  fail_connection(make_error(errc::unavailable, "{} failed on {}: {}{}{}", what, path_,
                             fi_strerror(err.err), detail ? ": " : "", detail ? detail : ""));
}

void fabric_connection::check_events() {
  uint32_t event = 0;
  alignas(8) uint8_t buf[256];
  ssize_t rc = fi_eq_read(parts_.eq.get(), &event, buf, sizeof buf, 0);
  if (rc == -FI_EAGAIN)
    return;
  if (rc == -FI_EAVAIL) {
    fi_eq_err_entry err{};
    fi_eq_readerr(parts_.eq.get(), &err, 0);
    return fail_connection(
        fi_error(errc::unavailable, fmt::format("connection {}", path_), -err.err));
  }
  if (rc >= 0 && event == FI_SHUTDOWN)
    return fail_connection(
        make_error(errc::unavailable, "{}: the peer closed the connection", path_));
  if (rc < 0)
    fail_connection(fi_error(errc::unavailable, "fi_eq_read", static_cast<int>(rc)));
}

void fabric_connection::check_deadlines() {
  auto now = clock::now();
  for (auto& [id, b] : batches_) {
    if (b.done || now < b.batch.deadline)
      continue;
    error late = make_error(errc::timeout, "lease {}: deadline passed after {} of {} writes on {}",
                            b.batch.lease_id, b.next, b.writes.size(), path_);
    if (b.next == 0 && b.outstanding == 0) {
      finish(id, b, std::move(late)); // nothing of it was posted: the connection stays usable
      continue;
    }
    // Posted writes cannot be recalled: closing the endpoint is what guarantees the provider no
    // longer reads the caller's buffers once wait() returns.
    return fail_connection(std::move(late), id);
  }
}

void fabric_connection::finish(transfer_id id, batch_state& b, error failure) {
  b.done = true;
  b.failure = std::move(failure);
  domain_->release(b.batch.locals);
  cv_.notify_all();
}

void fabric_connection::fail_connection(error why, transfer_id expired) {
  if (broken_)
    return;
  log::warn("transfer: {}", why.to_string());
  parts_.ep.reset(); // flushes and discards every posted operation
  parts_.cq.reset();
  parts_.eq.reset();
  for (auto& [id, b] : batches_)
    if (!b.done)
      finish(id, b,
             id == expired ? error{why.code(), why.message()}
                           : make_error(errc::unavailable, "lease {}: connection lost: {}",
                                        b.batch.lease_id, why.message()));
  broken_ = std::move(why);
  cv_.notify_all();
}

} // namespace troupe::cluster::transfer::detail
