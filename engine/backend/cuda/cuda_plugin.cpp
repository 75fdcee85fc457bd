// libtroupe_cuda.so's entry point: the table of what the engine's seam functions forward to
// (cuda_plugin.hpp), and the runtime calls of cuda_device.hpp. Built only into the plugin.
#include "engine/backend/cuda/cuda_plugin.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace troupe::engine::cuda {
namespace {

error runtime_error(std::string_view what, cudaError_t rc) {
  return make_error(errc::io_error, "{}: {}", what, cudaGetErrorString(rc));
}

expected<std::vector<cuda_device_info>> devices() {
  int count = 0;
  if (cudaError_t rc = cudaGetDeviceCount(&count); rc != cudaSuccess)
    return runtime_error("CUDA", rc);
  std::vector<cuda_device_info> out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess)
      continue;
    out.push_back({.index = i,
                   .name = prop.name,
                   .memory_bytes = prop.totalGlobalMem,
                   .cc_major = prop.major,
                   .cc_minor = prop.minor});
  }
  return out;
}

expected<void> copy(void* dst, const void* src, size_t bytes) {
  if (cudaError_t rc = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault); rc != cudaSuccess)
    return runtime_error(fmt::format("cudaMemcpy of {} bytes", bytes), rc);
  return {};
}

expected<void> wait_default_stream() {
  if (cudaError_t rc = cudaStreamSynchronize(cudaStreamLegacy); rc != cudaSuccess)
    return runtime_error("waiting for device copies", rc);
  return {};
}

expected<void*> alloc_host(size_t bytes) {
  void* p = nullptr;
  if (cudaError_t rc = cudaHostAlloc(&p, bytes, cudaHostAllocDefault); rc != cudaSuccess)
    return runtime_error(
        fmt::format("cudaHostAlloc of {} bytes (page-locked staging memory)", bytes), rc);
  return p;
}

void free_host(void* ptr) {
  (void)cudaFreeHost(ptr);
}

// A non-blocking stream per (thread, device), destroyed with the thread.
class thread_streams {
 public:
  ~thread_streams() {
    for (auto [device, stream] : streams_)
      (void)cudaStreamDestroy(stream);
  }
  expected<cudaStream_t> get(int device) {
    for (auto [d, s] : streams_)
      if (d == device)
        return s;
    cudaStream_t s = nullptr;
    if (cudaError_t rc = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking); rc != cudaSuccess)
      return runtime_error("cudaStreamCreate", rc);
    streams_.emplace_back(device, s);
    return s;
  }

 private:
  std::vector<std::pair<int, cudaStream_t>> streams_;
};

// The device `p` points into, or -1 (host memory).
int device_of(const void* p) {
  cudaPointerAttributes a{};
  const bool on_device =
      cudaPointerGetAttributes(&a, p) == cudaSuccess && a.type == cudaMemoryTypeDevice;
  (void)cudaGetLastError(); // an unregistered host pointer may leave an error behind
  return on_device ? a.device : -1;
}

expected<void> copy_all(std::span<const copy_span> copies) {
  if (copies.empty())
    return {};
  int device = device_of(copies.front().dst);
  if (device < 0)
    device = device_of(copies.front().src);
  if (device >= 0)
    if (cudaError_t rc = cudaSetDevice(device); rc != cudaSuccess)
      return runtime_error(fmt::format("cudaSetDevice({})", device), rc);
  thread_local thread_streams streams;
  auto stream = streams.get(std::max(device, 0));
  if (!stream)
    return std::move(stream).error();
  // One batch: a KV handoff is thousands of block-sized copies, whose one-by-one submission
  // would cost more than the copying.
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (const auto& c : copies) {
    dsts.push_back(c.dst);
    srcs.push_back(c.src);
    sizes.push_back(c.bytes);
  }
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t first = 0;
  if (cudaError_t rc = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), copies.size(),
                                            &attr, &first, 1, *stream);
      rc != cudaSuccess) {
    (void)cudaStreamSynchronize(*stream); // what was queued ends before the memory may
    return runtime_error(fmt::format("cudaMemcpyBatchAsync of {} copies", copies.size()), rc);
  }
  if (cudaError_t rc = cudaStreamSynchronize(*stream); rc != cudaSuccess)
    return runtime_error(fmt::format("{} staging copies", copies.size()), rc);
  return {};
}

const plugin_table table{
    .unavailable_reason = unavailable_reason,
    .make_backend = make_backend,
    .make_sampler = make_sampler,
    .make_nccl_communicator = make_nccl_communicator,
    .make_host_staged_communicator = make_host_staged_communicator,
    .devices = devices,
    .copy = copy,
    .wait_default_stream = wait_default_stream,
    .alloc_host = alloc_host,
    .free_host = free_host,
    .copy_all = copy_all,
};

} // namespace
} // namespace troupe::engine::cuda

extern "C" const troupe::engine::cuda::plugin_table* troupe_cuda_plugin() {
  return &troupe::engine::cuda::table;
}
