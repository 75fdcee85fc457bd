// One TCP stream of the socket transport: a sender thread turns batches into segments (header,
// range table, payload gathered with sendmsg) and a reader thread scatters the peer's segments into
// our registrations (readv) and queues their notices. Made by socket_transport::connect/accept.
// A segment into the peer's GPU memory (CUDA IPC mode) is copied by the sender through the mapped
// allocation first and then sent as its header and range table only (flag_written); the reader
// checks the ranges against its registrations and counts them, reading no payload.
#pragma once

#include <sys/uio.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <thread>

#include "cluster/transfer/socket_transport.hpp"
#include "cluster/transfer/write_plan.hpp"

namespace troupe::cluster::transfer::detail {

// The stream: segments of (header, `ranges` wire_ranges, their payload unless flag_written).
inline constexpr uint32_t segment_magic = 0x47534b54; // "TKSG"
inline constexpr uint32_t flag_last = 1, flag_cancelled = 2;
inline constexpr uint32_t flag_silent = 4;  // the batch's last segment, but no notice
inline constexpr uint32_t flag_written = 8; // the sender wrote the ranges (CUDA IPC): no payload
inline constexpr uint32_t known_flags = flag_last | flag_cancelled | flag_silent | flag_written;
struct segment_header {
  uint32_t magic = segment_magic;
  uint32_t flags = 0;
  uint64_t lease_id = 0;
  uint64_t ranges = 0;
};
struct wire_range {
  uint64_t key = 0, offset = 0, length = 0;
};

class socket_connection final : public kv_connection {
 public:
  socket_connection(std::shared_ptr<socket_transport> transport, int fd, std::string path);
  ~socket_connection() override;

  expected<transfer_id> post(write_batch batch) override;
  expected<transfer_result> wait(transfer_id id) override;
  void cancel(transfer_id id) override;
  expected<transfer_notice> wait_notice(clock::time_point deadline) override;
  std::string describe_path() const override { return path_; }

 private:
  struct job {
    write_batch batch;
    std::vector<planned_write> writes;
    std::vector<region_descriptor> locals;
    bool cancel = false;
    bool done = false;
    // The send thread is writing it (the lock released around each segment): only that thread
    // ends it, so that wait() cannot free it underneath.
    bool sending = false;
    uint64_t bytes = 0;
    uint64_t segments = 0;
    error failure;
  };
  void send_loop();
  void send_job(job& j, std::unique_lock<std::mutex>& lock);
  expected<void> send_segment(job& j, size_t first, size_t count, uint32_t flags);
  // CUDA IPC: the writes [first, first + count) copied into the peer's mapped GPU memory.
  expected<void> copy_by_ipc(job& j, size_t first, size_t count);
  expected<char*> mapped(const cuda_ipc_part& remote, const region_descriptor& local);
  void read_loop();
  expected<void> read_segment();
  expected<void> io_all(bool sending, iovec* iov, int count, clock::time_point deadline);
  void fail(error why);

  std::shared_ptr<socket_transport> transport_;
  int fd_;
  std::string path_;
  std::mutex mu_;
  std::condition_variable cv_;      // waiters in wait() / wait_notice()
  std::condition_variable send_cv_; // the sender thread: a batch was queued, or stop
  std::map<transfer_id, job> jobs_;
  std::deque<transfer_id> queue_;
  std::deque<transfer_notice> notices_;
  std::map<uint64_t, uint64_t> incoming_bytes_; // lease → bytes received so far
  transfer_id next_id_ = 1;
  bool stop_ = false;
  error broken_;
  std::map<std::array<uint8_t, 64>, char*> mapped_; // the peer's allocations (sender thread)
  std::thread sender_, reader_;
};

} // namespace troupe::cluster::transfer::detail
