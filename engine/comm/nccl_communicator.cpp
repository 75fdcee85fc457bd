// NCCL behind device_communicator. Communicators are created non-blocking (ncclConfig_t::blocking
// = 0) so that init, every call and synchronize() can poll ncclCommGetAsyncError against a
// deadline and abort the communicator instead of hanging on a dead or stuck peer.
#include <cstring>
#include <thread>

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include "engine/comm/cuda_communicators.hpp"

namespace troupe::engine::comm {

namespace {

using clk = std::chrono::steady_clock;

ncclDataType_t nccl_type(device_dtype t) {
  return t == device_dtype::f32 ? ncclFloat32 : ncclBfloat16;
}

class nccl_communicator final : public device_communicator {
 public:
  nccl_communicator(int rank, int size, std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), timeout_(timeout) {}
  ~nccl_communicator() override { close(); }

  // Non-blocking ncclCommInitRankConfig, then waits (bounded) for it to finish.
  expected<void> init(const ncclUniqueId& id, int device) {
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess)
      return make_error(errc::unavailable, "nccl rank {}: cudaSetDevice({}): {}", rank_, device,
                        cudaGetErrorString(e));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress)
      return abort_with(errc::unavailable, fmt::format("ncclCommInitRankConfig: {}", text(r)));
    return settle("init");
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  bool capturable() const override { return true; }

  expected<void> all_reduce_sum(void* data, size_t n, device_dtype t, device_stream s) override {
    return call("all_reduce",
                ncclAllReduce(data, data, n, nccl_type(t), ncclSum, comm(), to_cuda(s)));
  }
  expected<void> all_gather(const void* in, void* out, size_t n, device_dtype t,
                            device_stream s) override {
    return call("all_gather", ncclAllGather(in, out, n, nccl_type(t), comm(), to_cuda(s)));
  }
  expected<void> broadcast(void* data, size_t n, device_dtype t, int root,
                           device_stream s) override {
    return call("broadcast", ncclBroadcast(data, data, n, nccl_type(t), root, comm(), to_cuda(s)));
  }
  expected<void> all_to_all(const void* send, std::span<const int64_t> send_counts, void* recv,
                            std::span<const int64_t> recv_counts, device_dtype t,
                            device_stream s) override {
    auto totals = all_to_all_totals(size_, send_counts, recv_counts);
    if (!totals)
      return std::move(totals).error();
    if (comm_ == nullptr)
      return dead("all_to_all");
    const size_t bytes = dtype_bytes(t);
    const auto* in = static_cast<const char*>(send);
    auto* out = static_cast<char*>(recv);
    ncclResult_t first_error = ncclSuccess;
    auto note = [&](ncclResult_t r) {
      if (r != ncclSuccess && r != ncclInProgress && first_error == ncclSuccess)
        first_error = r;
    };
    note(ncclGroupStart());
    for (int r = 0; r < size_; ++r) {
      const auto ns = static_cast<size_t>(send_counts[static_cast<size_t>(r)]);
      const auto nr = static_cast<size_t>(recv_counts[static_cast<size_t>(r)]);
      if (ns > 0)
        note(ncclSend(in, ns, nccl_type(t), r, comm(), to_cuda(s)));
      if (nr > 0)
        note(ncclRecv(out, nr, nccl_type(t), r, comm(), to_cuda(s)));
      in += ns * bytes;
      out += nr * bytes;
    }
    const ncclResult_t end = ncclGroupEnd(); // always closes the group opened above
    return call("all_to_all", first_error != ncclSuccess ? first_error : end);
  }
  expected<void> send(const void* data, size_t n, device_dtype t, int to,
                      device_stream s) override {
    return call("send", ncclSend(data, n, nccl_type(t), to, comm(), to_cuda(s)));
  }
  expected<void> recv(void* data, size_t n, device_dtype t, int from, device_stream s) override {
    return call("recv", ncclRecv(data, n, nccl_type(t), from, comm(), to_cuda(s)));
  }

  expected<void> synchronize(device_stream s) override {
    if (comm_ == nullptr)
      return dead("synchronize");
    const auto deadline = clk::now() + timeout_;
    for (;;) {
      cudaError_t q = cudaStreamQuery(to_cuda(s));
      if (q == cudaSuccess)
        return {};
      if (q != cudaErrorNotReady)
        return make_error(errc::internal, "nccl rank {}: stream: {}", rank_, cudaGetErrorString(q));
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress)
        return abort_with(errc::unavailable, fmt::format("synchronize: {}", text(async)));
      if (clk::now() > deadline)
        return abort_with(errc::timeout,
                          fmt::format("synchronize: the stream's collectives did not finish "
                                      "within {} ms (a peer is dead or stuck)",
                                      timeout_.count()));
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

 private:
  static cudaStream_t to_cuda(device_stream s) { return reinterpret_cast<cudaStream_t>(s); }
  ncclComm_t comm() const { return comm_; }

  std::string text(ncclResult_t r) const {
    std::string s = ncclGetErrorString(r);
    if (comm_ != nullptr) {
      const char* last = ncclGetLastError(comm_);
      if (last != nullptr && *last != '\0')
        s += fmt::format(" ({})", last);
    }
    return s;
  }
  error dead(const char* op) const {
    return make_error(errc::unavailable, "nccl rank {}: {} on an aborted communicator", rank_, op);
  }
  // Aborts the communicator (ending its kernels and proxy threads) and returns the error.
  error abort_with(errc code, std::string what) {
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return make_error(code, "nccl rank {} of {}: {} (communicator aborted)", rank_, size_, what);
  }
  // Waits until the last non-blocking operation has been issued (no longer ncclInProgress).
  expected<void> settle(const char* op) {
    const auto deadline = clk::now() + timeout_;
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async == ncclSuccess)
        return {};
      if (async != ncclInProgress)
        return abort_with(errc::unavailable, fmt::format("{}: {}", op, text(async)));
      if (clk::now() > deadline)
        return abort_with(errc::timeout,
                          fmt::format("{} did not complete within {} ms", op, timeout_.count()));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  expected<void> call(const char* op, ncclResult_t r) {
    if (comm_ == nullptr)
      return dead(op);
    if (r == ncclSuccess)
      return {};
    if (r == ncclInProgress)
      return settle(op);
    return abort_with(errc::unavailable, fmt::format("{}: {}", op, text(r)));
  }
  // Finalize (flushes outstanding work, bounded) then destroy; abort when that fails.
  void close() {
    if (comm_ == nullptr)
      return;
    ncclResult_t r = ncclCommFinalize(comm_);
    if ((r == ncclSuccess || r == ncclInProgress) && settle("finalize")) {
      ncclCommDestroy(comm_);
      comm_ = nullptr;
    } else if (comm_ != nullptr) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
  }

  ncclComm_t comm_ = nullptr;
  int rank_, size_;
  std::chrono::milliseconds timeout_;
};

} // namespace

} // namespace troupe::engine::comm

namespace troupe::engine::cuda {

using namespace comm;

expected<std::unique_ptr<device_communicator>>
make_nccl_communicator(rendezvous_store& store, int rank, int size, const nccl_options& options) {
  if (size < 1 || rank < 0 || rank >= size)
    return make_error(errc::invalid_argument, "nccl group: rank {} outside a group of {}", rank,
                      size);
  const std::string key = options.prefix + "/unique_id";
  ncclUniqueId id{};
  if (rank == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
      return make_error(errc::unavailable, "ncclGetUniqueId: {}", ncclGetErrorString(r));
    std::vector<char> bytes(sizeof id.internal);
    std::memcpy(bytes.data(), id.internal, bytes.size());
    TROUPE_TRY_VOID(store.set(key, bytes));
  } else {
    auto bytes = store.get(key, options.timeout);
    if (!bytes)
      return std::move(bytes).error().context(
          fmt::format("nccl rank {} fetching the unique id", rank));
    if (bytes->size() != sizeof id.internal)
      return make_error(errc::parse_error, "nccl unique id under {} holds {} bytes, expected {}",
                        key, bytes->size(), sizeof id.internal);
    std::memcpy(id.internal, bytes->data(), bytes->size());
  }
  auto c = std::make_unique<nccl_communicator>(rank, size, options.timeout);
  if (auto r = c->init(id, options.device); !r)
    return std::move(r).error().context(
        fmt::format("joining NCCL group '{}' of {}", options.prefix, size));
  return std::unique_ptr<device_communicator>(std::move(c));
}

} // namespace troupe::engine::cuda
