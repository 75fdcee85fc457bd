// A plain TCP transport behind kv_transport, for hosts without RDMA: one stream per connection, a
// batch sent as segments of (range table + payload) with gathered sendmsg and scattered readv, so
// scattered KV blocks cost one syscall per ~1,000 blocks instead of one write each (libfabric tcp's
// cost). Threads: a sender and a reader per connection; connect/accept block up to their deadline.
// CUDA IPC mode (processes of one host): GPU memory registers too, described with its CUDA IPC
// part; a batch into a peer's GPU memory is copied by the writer itself through the mapped
// allocation (device copies from its GPU or host memory), and only the range table and notice
// travel on the socket.
#pragma once

#include <map>
#include <memory>
#include <mutex>

#include "cluster/transfer/kv_transport.hpp"
#include "cluster/transfer/region_table.hpp"

namespace troupe::cluster::transfer {

class socket_transport final : public kv_transport,
                               public std::enable_shared_from_this<socket_transport> {
 public:
  static std::shared_ptr<socket_transport> create(std::string host = "127.0.0.1");
  // CUDA IPC mode. Errors: CUDA unusable here (the plugin's reason), no host identity.
  static expected<std::shared_ptr<socket_transport>>
  create_with_cuda_ipc(std::string host = "127.0.0.1");
  ~socket_transport() override;

  std::string name() const override { return "socket"; }
  bool cuda_ipc() const { return cuda_ipc_; }
  expected<region_id> register_memory(void* ptr, size_t length, memory_kind kind) override;
  expected<void> deregister(region_id id) override;
  expected<region_descriptor> describe(region_id id) const override {
    return regions_.describe(id);
  }
  size_t registration_count() const override { return regions_.size(); }

  expected<std::string> listen(uint16_t port); // returns host:port
  expected<std::unique_ptr<kv_connection>> accept(clock::time_point deadline);
  expected<std::unique_ptr<kv_connection>> connect(const std::string& address,
                                                   clock::time_point deadline);

  // For connections: local regions pinned for a batch, and the target-side lookup of a range.
  expected<std::vector<region_descriptor>> acquire(std::span<const region_id> ids) {
    return regions_.acquire(ids);
  }
  void release(std::span<const region_id> ids) { regions_.release(ids); }
  expected<char*> target_range(uint64_t key, uint64_t offset, uint64_t length) const;
  // Whether this transport can write into the peer's region `remote` (GPU memory: by CUDA IPC,
  // from this host, in IPC mode); the error says why not.
  expected<void> check_writable(const region_descriptor& remote) const;
  // Whether a live CUDA IPC registration of this very process has this handle: two ranks of one
  // node process, where cudaIpcOpenMemHandle refuses the handle and the address is valid as is.
  static bool exported_here(const std::array<uint8_t, 64>& handle);

 private:
  socket_transport(std::string host, bool cuda_ipc, std::optional<host_id> here)
    : host_(std::move(host)), cuda_ipc_(cuda_ipc), here_(here) {}
  std::string host_;
  bool cuda_ipc_ = false;
  std::optional<host_id> here_; // this host, where /proc tells it
  int listen_fd_ = -1;
  region_table regions_;
};

} // namespace troupe::cluster::transfer
