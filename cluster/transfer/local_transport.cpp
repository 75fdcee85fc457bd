#include "cluster/transfer/local_transport.hpp"

#include <condition_variable>
#include <cstring>
#include <deque>
#include <thread>

#include "cluster/transfer/write_plan.hpp"
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/cuda_device.hpp"

namespace troupe::cluster::transfer {

expected<region_id> local_transport::register_memory(void* ptr, size_t length, memory_kind kind) {
  if (kind == memory_kind::cuda) // GPU memory is copied through the CUDA plugin
    if (auto why = engine::cuda_unavailable_reason(); !why.empty())
      return make_error(errc::unsupported, "register_memory of GPU memory: {}", why);
  return regions_.add(ptr, length, kind);
}

expected<void> local_transport::check_live(const region_descriptor& d) const {
  auto live = regions_.find(d.key);
  if (!live || !(*live == d))
    return make_error(errc::not_found, "remote region at {:#x} (+{}) is not registered by the peer",
                      d.addr, d.length);
  return {};
}

namespace {

// Writes touching GPU memory go to the CUDA plugin in groups of about this many bytes (one
// batched copy each, waited for), so that cancel and deadline are looked at between groups.
constexpr uint64_t device_group_bytes = uint64_t{64} << 20;

// Notices for one direction; shared by the writing end (producer) and the notified end (consumer).
struct notice_queue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<transfer_notice> notices;
  bool closed = false;
  void push(transfer_notice n) {
    std::lock_guard lock(mu);
    notices.push_back(n);
    cv.notify_all();
  }
};

class local_connection final : public kv_connection {
 public:
  local_connection(std::shared_ptr<local_transport> self, std::shared_ptr<local_transport> peer,
                   std::shared_ptr<notice_queue> outgoing, std::shared_ptr<notice_queue> incoming,
                   uint64_t max_write)
    : self_(std::move(self)), peer_(std::move(peer)), out_(std::move(outgoing)),
      in_(std::move(incoming)), max_write_(max_write), worker_([this] { run(); }) {}

  ~local_connection() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
    std::lock_guard lock(out_->mu);
    out_->closed = true;
    out_->cv.notify_all();
    for (auto& [id, j] : jobs_)
      if (!j.done)
        self_->release(j.batch.locals);
  }

  expected<transfer_id> post(write_batch batch) override {
    for (const region_descriptor& d : batch.remotes)
      TROUPE_TRY_VOID(peer_->check_live(d));
    auto acquired = self_->acquire(batch.locals);
    if (!acquired)
      return std::move(acquired).error();
    std::vector<region_descriptor> locals = std::move(*acquired);
    std::vector<uint64_t> lengths;
    for (const auto& d : locals)
      lengths.push_back(d.length);
    auto writes = plan_writes(batch, lengths, max_write_);
    if (!writes) {
      self_->release(batch.locals);
      return std::move(writes).error().context(fmt::format("lease {}", batch.lease_id));
    }
    std::lock_guard lock(mu_);
    transfer_id id = next_id_++;
    jobs_[id] = job{std::move(batch), std::move(*writes), std::move(locals)};
    queue_.push_back(id);
    cv_.notify_all();
    return id;
  }

  expected<transfer_result> wait(transfer_id id) override {
    std::unique_lock lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end())
      return make_error(errc::not_found, "wait: no transfer {}", id);
    cv_.wait(lock, [&] { return it->second.done; });
    job j = std::move(it->second);
    jobs_.erase(it);
    if (j.failure)
      return std::move(j.failure);
    return transfer_result{j.bytes, j.writes.size()};
  }

  void cancel(transfer_id id) override {
    std::lock_guard lock(mu_);
    if (auto it = jobs_.find(id); it != jobs_.end())
      it->second.cancel = true;
  }

  expected<transfer_notice> wait_notice(clock::time_point deadline) override {
    std::unique_lock lock(in_->mu);
    if (!in_->cv.wait_until(lock, deadline, [&] { return !in_->notices.empty() || in_->closed; }))
      return make_error(errc::timeout, "no completion notice before the deadline (local)");
    if (in_->notices.empty())
      return make_error(errc::unavailable, "local peer closed the connection");
    transfer_notice n = in_->notices.front();
    in_->notices.pop_front();
    return n;
  }

  std::string describe_path() const override { return "local"; }

 private:
  struct job {
    write_batch batch;
    std::vector<planned_write> writes;
    std::vector<region_descriptor> locals;
    bool cancel = false;
    bool done = false;
    uint64_t bytes = 0;
    error failure;
  };

  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_)
        return;
      transfer_id id = queue_.front();
      queue_.pop_front();
      execute(lock, jobs_[id]);
      self_->release(jobs_[id].batch.locals);
      jobs_[id].done = true;
      cv_.notify_all();
    }
  }

  // Copies unlocked: host writes one by one, device writes in batched groups; cancel and
  // deadline are looked at between them.
  void execute(std::unique_lock<std::mutex>& lock, job& j) {
    std::vector<engine::copy_span> group;
    uint64_t group_bytes = 0;
    auto flush = [&]() -> expected<void> {
      if (group.empty())
        return {};
      lock.unlock();
      auto copied = engine::cuda_copy_all(group);
      lock.lock();
      if (copied)
        j.bytes += group_bytes;
      group.clear();
      group_bytes = 0;
      return copied;
    };
    for (const planned_write& w : j.writes) {
      if (j.cancel || stop_ || clock::now() >= j.batch.deadline)
        break;
      const region_descriptor &src = j.locals[w.local], &dst = j.batch.remotes[w.remote];
      void* to = reinterpret_cast<char*>(dst.addr) + w.remote_offset;
      const void* from = reinterpret_cast<const char*>(src.addr) + w.local_offset;
      if (src.kind == memory_kind::cuda || dst.kind == memory_kind::cuda) {
        group.push_back({to, from, w.length});
        group_bytes += w.length;
        if (group_bytes < device_group_bytes)
          continue;
        if (auto ok = flush(); !ok) {
          j.failure = std::move(ok).error();
          return;
        }
        continue;
      }
      lock.unlock();
      std::memcpy(to, from, w.length);
      lock.lock();
      j.bytes += w.length;
    }
    if (auto ok = flush(); !ok) {
      j.failure = std::move(ok).error();
      return;
    }
    const bool cancelled = j.cancel || stop_, late = j.bytes < total_bytes(j.writes);
    if (cancelled)
      j.failure = make_error(errc::cancelled, "lease {}: cancelled after {} bytes",
                             j.batch.lease_id, j.bytes);
    else if (late)
      j.failure = make_error(errc::timeout, "lease {}: deadline passed after {} bytes",
                             j.batch.lease_id, j.bytes);
    if (j.batch.notify)
      out_->push({j.batch.lease_id, j.bytes, cancelled || late});
  }

  std::shared_ptr<local_transport> self_, peer_;
  std::shared_ptr<notice_queue> out_, in_;
  uint64_t max_write_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<transfer_id, job> jobs_;
  std::deque<transfer_id> queue_;
  transfer_id next_id_ = 1;
  bool stop_ = false;
  std::thread worker_;
};

} // namespace

std::pair<std::unique_ptr<kv_connection>, std::unique_ptr<kv_connection>>
local_transport::connect_pair(std::shared_ptr<local_transport> a,
                              std::shared_ptr<local_transport> b, uint64_t max_write) {
  auto a_to_b = std::make_shared<notice_queue>(), b_to_a = std::make_shared<notice_queue>();
  return {std::make_unique<local_connection>(a, b, a_to_b, b_to_a, max_write),
          std::make_unique<local_connection>(b, a, b_to_a, a_to_b, max_write)};
}

} // namespace troupe::cluster::transfer
