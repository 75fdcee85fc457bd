// device_communicator over a host communicator: each call waits for the stream, copies the device
// buffer to the host (bf16 widened to float32), runs the host collective, and copies the result
// back. Built with CUDA only. Blocking and uncapturable by construction.
#include <bit>
#include <vector>

#include <cuda_runtime.h>
#include <fmt/format.h>

#include "engine/comm/cuda_communicators.hpp"
#include "engine/model/dtype.hpp"

namespace troupe::engine::comm {

namespace {

#define TROUPE_STAGED_CUDA(call)                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess)                                                                         \
      return make_error(errc::internal, "host-staged {}: {} ({})", #call, cudaGetErrorName(e_),    \
                        cudaGetErrorString(e_));                                                   \
  } while (false)

class host_staged_communicator final : public device_communicator {
 public:
  explicit host_staged_communicator(communicator& host) : host_(host) {}

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  std::string name() const override { return "host-staged"; }
  bool capturable() const override { return false; }

  expected<void> all_reduce_sum(void* data, size_t n, device_dtype t, device_stream s) override {
    TROUPE_TRY_VOID(to_host(data, n, t, s, a_));
    TROUPE_TRY_VOID(host_.all_reduce_sum(a_));
    return to_device(a_, data, t, s);
  }
  expected<void> all_gather(const void* in, void* out, size_t n, device_dtype t,
                            device_stream s) override {
    TROUPE_TRY_VOID(to_host(in, n, t, s, a_));
    b_.resize(n * static_cast<size_t>(size()));
    TROUPE_TRY_VOID(host_.all_gather(a_, b_));
    return to_device(b_, out, t, s);
  }
  expected<void> broadcast(void* data, size_t n, device_dtype t, int root,
                           device_stream s) override {
    TROUPE_TRY_VOID(to_host(data, n, t, s, a_));
    TROUPE_TRY_VOID(host_.broadcast(a_, root));
    return to_device(a_, data, t, s);
  }
  expected<void> all_to_all(const void* send, std::span<const int64_t> send_counts, void* recv,
                            std::span<const int64_t> recv_counts, device_dtype t,
                            device_stream s) override {
    auto totals = all_to_all_totals(size(), send_counts, recv_counts);
    if (!totals)
      return std::move(totals).error();
    TROUPE_TRY_VOID(to_host(send, static_cast<size_t>(totals->first), t, s, a_));
    b_.resize(static_cast<size_t>(totals->second));
    TROUPE_TRY_VOID(host_.all_to_all(a_, send_counts, b_, recv_counts));
    return to_device(b_, recv, t, s);
  }
  expected<void> send(const void* data, size_t n, device_dtype t, int to,
                      device_stream s) override {
    TROUPE_TRY_VOID(to_host(data, n, t, s, a_));
    return host_.send(a_, to, tag_);
  }
  expected<void> recv(void* data, size_t n, device_dtype t, int from, device_stream s) override {
    a_.resize(n);
    TROUPE_TRY_VOID(host_.recv(a_, from, tag_));
    return to_device(a_, data, t, s);
  }
  expected<void> synchronize(device_stream s) override {
    TROUPE_STAGED_CUDA(cudaStreamSynchronize(s));
    return {};
  }

 private:
  // dst[n] = the device buffer as float32, after every earlier operation on `s`.
  expected<void> to_host(const void* src, size_t n, device_dtype t, device_stream s,
                         std::vector<float>& dst) {
    dst.resize(n);
    if (t == device_dtype::f32) {
      TROUPE_STAGED_CUDA(cudaMemcpyAsync(dst.data(), src, n * 4, cudaMemcpyDeviceToHost, s));
      TROUPE_STAGED_CUDA(cudaStreamSynchronize(s));
      return {};
    }
    bits_.resize(n);
    TROUPE_STAGED_CUDA(cudaMemcpyAsync(bits_.data(), src, n * 2, cudaMemcpyDeviceToHost, s));
    TROUPE_STAGED_CUDA(cudaStreamSynchronize(s));
    for (size_t i = 0; i < n; ++i)
      dst[i] = bf16_to_f32(bits_[i]);
    return {};
  }
  // The device buffer = src (rounded to bf16 where it is one); done when this returns.
  expected<void> to_device(const std::vector<float>& src, void* dst, device_dtype t,
                           device_stream s) {
    const void* from = src.data();
    if (t == device_dtype::bf16) {
      bits_.resize(src.size());
      for (size_t i = 0; i < src.size(); ++i)
        bits_[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(round_to_bf16(src[i])) >> 16);
      from = bits_.data();
    }
    TROUPE_STAGED_CUDA(
        cudaMemcpyAsync(dst, from, src.size() * dtype_bytes(t), cudaMemcpyHostToDevice, s));
    TROUPE_STAGED_CUDA(cudaStreamSynchronize(s)); // the staging buffers are reused next call
    return {};
  }

  static constexpr uint32_t tag_ = 0x5d; // one stream of messages per pair of ranks
  communicator& host_;
  std::vector<float> a_, b_;
  std::vector<uint16_t> bits_;
};

} // namespace

} // namespace troupe::engine::comm

namespace troupe::engine::cuda {

expected<std::unique_ptr<comm::device_communicator>>
make_host_staged_communicator(comm::communicator& host) {
  return std::unique_ptr<comm::device_communicator>(
      std::make_unique<comm::host_staged_communicator>(host));
}

} // namespace troupe::engine::cuda
