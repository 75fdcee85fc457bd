#include "cluster/transfer/socket_transport.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "cluster/transfer/socket_connection.hpp"
#include "engine/backend/cuda/cuda_device.hpp"

namespace troupe::cluster::transfer {
namespace {

error sys_error(std::string_view what) {
  return make_error(errc::unavailable, "{}: {}", what, std::strerror(errno));
}

int ms_until(clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1000000));
}

void tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

expected<sockaddr_in> resolve(const std::string& host, const std::string& port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return make_error(errc::not_found, "resolving {}:{}: {}", host, port, gai_strerror(rc));
  sockaddr_in a = *reinterpret_cast<sockaddr_in*>(res->ai_addr);
  freeaddrinfo(res);
  return a;
}

// The handles of this process's live CUDA IPC registrations (any transport), with their counts.
struct exported_handles {
  std::mutex mu;
  std::map<std::array<uint8_t, 64>, int> live;
};
exported_handles& exported_handles_of_process() {
  static exported_handles e;
  return e;
}

} // namespace

bool socket_transport::exported_here(const std::array<uint8_t, 64>& handle) {
  auto& e = exported_handles_of_process();
  std::lock_guard lock(e.mu);
  return e.live.count(handle) > 0;
}

std::shared_ptr<socket_transport> socket_transport::create(std::string host) {
  auto here = this_host_id();
  return std::shared_ptr<socket_transport>(new socket_transport(
      std::move(host), false, here ? std::optional<host_id>(*here) : std::nullopt));
}

expected<std::shared_ptr<socket_transport>>
socket_transport::create_with_cuda_ipc(std::string host) {
  auto devices = engine::cuda_devices();
  if (!devices)
    return std::move(devices).error().context("the socket transport's CUDA IPC mode");
  if (devices->empty())
    return make_error(errc::unsupported, "the socket transport's CUDA IPC mode: no CUDA device");
  auto here = this_host_id();
  if (!here)
    return std::move(here).error().context("the socket transport's CUDA IPC mode");
  return std::shared_ptr<socket_transport>(new socket_transport(std::move(host), true, *here));
}

socket_transport::~socket_transport() {
  if (listen_fd_ >= 0)
    close(listen_fd_);
}

expected<region_id> socket_transport::register_memory(void* ptr, size_t length, memory_kind kind) {
  if (kind != memory_kind::cuda)
    return regions_.add(ptr, length, kind);
  if (!cuda_ipc_)
    return make_error(errc::unsupported, "the socket transport registers host memory only (GPU "
                                         "memory in its CUDA IPC mode, between processes of one "
                                         "host)");
  auto exported = engine::cuda_ipc_export(ptr, length);
  if (!exported)
    return std::move(exported).error().context("registering GPU memory for CUDA IPC");
  auto id = regions_.add(ptr, length, kind,
                         cuda_ipc_part{.handle = exported->handle,
                                       .offset = exported->offset,
                                       .device = exported->device,
                                       .host = *here_});
  if (id) {
    std::lock_guard lock(exported_handles_of_process().mu);
    ++exported_handles_of_process().live[exported->handle];
  }
  return id;
}

expected<void> socket_transport::deregister(region_id id) {
  auto d = regions_.describe(id);
  TROUPE_TRY_VOID(regions_.remove(id));
  if (d && d->ipc) {
    auto& e = exported_handles_of_process();
    std::lock_guard lock(e.mu);
    if (auto it = e.live.find(d->ipc->handle); it != e.live.end() && --it->second == 0)
      e.live.erase(it);
  }
  return {};
}

expected<void> socket_transport::check_writable(const region_descriptor& remote) const {
  if (remote.kind != memory_kind::cuda)
    return {};
  if (!remote.ipc)
    return make_error(errc::unsupported,
                      "the peer's region {} is GPU memory without a CUDA IPC "
                      "handle: the socket transport cannot write it",
                      remote.key);
  if (!here_ || remote.ipc->host != *here_)
    return make_error(errc::unsupported,
                      "the peer's region {} is GPU memory of another host (boot id {}, this "
                      "host's {}): CUDA IPC works between processes of one host only",
                      remote.key, to_string(remote.ipc->host),
                      here_ ? to_string(*here_) : std::string("unknown"));
  if (!cuda_ipc_)
    return make_error(errc::unsupported,
                      "the peer's region {} is GPU memory: this socket "
                      "transport is not in CUDA IPC mode",
                      remote.key);
  return {};
}

expected<char*> socket_transport::target_range(uint64_t key, uint64_t offset,
                                               uint64_t length) const {
  auto live = regions_.find(key);
  if (!live)
    return make_error(errc::not_found, "peer wrote to unknown region key {}", key);
  const region_descriptor& d = *live;
  if (offset > d.length || length > d.length - offset)
    return make_error(errc::out_of_range, "peer wrote [{}, +{}) outside a region of {} bytes",
                      offset, length, d.length);
  return reinterpret_cast<char*>(d.addr) + offset;
}

expected<std::string> socket_transport::listen(uint16_t port) {
  auto addr = resolve(host_, std::to_string(port));
  if (!addr)
    return std::move(addr).error();
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  socklen_t len = sizeof *addr;
  if (bind(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) != 0 || ::listen(fd, 16) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&*addr), &len) != 0) {
    auto e = sys_error(fmt::format("listen on {}:{}", host_, port));
    close(fd);
    return e;
  }
  listen_fd_ = fd;
  return fmt::format("{}:{}", host_, ntohs(addr->sin_port));
}

expected<std::unique_ptr<kv_connection>> socket_transport::accept(clock::time_point deadline) {
  if (listen_fd_ < 0)
    return make_error(errc::invalid_argument, "accept: listen() first");
  pollfd pfd{listen_fd_, POLLIN, 0};
  if (poll(&pfd, 1, ms_until(deadline)) <= 0)
    return make_error(errc::timeout, "accept: no peer before the deadline");
  int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0)
    return sys_error("accept");
  tune(fd);
  return std::unique_ptr<kv_connection>(
      new detail::socket_connection(shared_from_this(), fd, "socket accepted on " + host_));
}

expected<std::unique_ptr<kv_connection>> socket_transport::connect(const std::string& address,
                                                                   clock::time_point deadline) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
    return make_error(errc::invalid_argument, "connect: '{}' is not host:port", address);
  auto addr = resolve(address.substr(0, colon), address.substr(colon + 1));
  if (!addr)
    return std::move(addr).error();
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  tune(fd);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) != 0 &&
      errno != EINPROGRESS) {
    auto e = sys_error(fmt::format("connect to {}", address));
    close(fd);
    return e;
  }
  pollfd pfd{fd, POLLOUT, 0};
  int err = 0;
  socklen_t len = sizeof err;
  if (poll(&pfd, 1, ms_until(deadline)) <= 0) {
    close(fd);
    return make_error(errc::timeout, "connect to {}: no answer before the deadline", address);
  }
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    close(fd);
    return make_error(errc::unavailable, "connect to {}: {}", address, std::strerror(err));
  }
  return std::unique_ptr<kv_connection>(
      new detail::socket_connection(shared_from_this(), fd, "socket to " + address));
}

} // namespace troupe::cluster::transfer
