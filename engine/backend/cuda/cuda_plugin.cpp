// libtroupe_cuda.so's entry point: the table of what the engine's seam functions forward to
// (cuda_plugin.hpp), and the runtime calls of cuda_device.hpp. Built only into the plugin.
#include "engine/backend/cuda/cuda_plugin.hpp"

#include <cuda.h> // CUresult, CUdeviceptr: the driver is reached through the runtime, not linked
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
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

static_assert(sizeof(cudaIpcMemHandle_t) == sizeof(cuda_ipc_memory::handle));

// The cudaMalloc allocation `p` lies in (base, size): cuMemGetAddressRange, looked up through the
// runtime so that the plugin does not link libcuda.
expected<std::pair<uintptr_t, size_t>> allocation_of(const void* p) {
  using get_range_fn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaError_t rc = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000,
                                                        cudaEnableDefault, &found);
      rc != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr)
    return runtime_error("looking up cuMemGetAddressRange in the CUDA driver",
                         rc != cudaSuccess ? rc : cudaErrorSymbolNotFound);
  CUdeviceptr base = 0;
  size_t size = 0;
  if (CUresult rc =
          reinterpret_cast<get_range_fn>(fn)(&base, &size, reinterpret_cast<CUdeviceptr>(p));
      rc != CUDA_SUCCESS)
    return make_error(errc::io_error, "cuMemGetAddressRange({}): CUDA driver error {}", p,
                      static_cast<int>(rc));
  return std::pair{static_cast<uintptr_t>(base), size};
}

expected<cuda_ipc_memory> ipc_export(const void* ptr, size_t bytes) {
  cudaPointerAttributes a{};
  if (cudaError_t rc = cudaPointerGetAttributes(&a, ptr); rc != cudaSuccess)
    return runtime_error(fmt::format("cudaPointerGetAttributes({})", ptr), rc);
  if (a.type != cudaMemoryTypeDevice)
    return make_error(errc::invalid_argument,
                      "CUDA IPC exports device memory only: {} is not (memory type {})", ptr,
                      static_cast<int>(a.type));
  if (cudaError_t rc = cudaSetDevice(a.device); rc != cudaSuccess)
    return runtime_error(fmt::format("cudaSetDevice({})", a.device), rc);
  auto range = allocation_of(ptr);
  if (!range)
    return std::move(range).error();
  const auto [base, size] = *range;
  const uint64_t offset = reinterpret_cast<uintptr_t>(ptr) - base;
  if (offset > size || bytes > size - offset)
    return make_error(errc::invalid_argument,
                      "CUDA IPC: [{}, +{}) extends past its allocation of {} bytes at {:#x}", ptr,
                      bytes, size, base);
  cudaIpcMemHandle_t h{};
  if (cudaError_t rc = cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)); rc != cudaSuccess)
    return runtime_error(fmt::format("cudaIpcGetMemHandle of the allocation at {:#x} ({} bytes, "
                                     "device {}; only cudaMalloc memory can be exported)",
                                     base, size, a.device),
                         rc);
  cuda_ipc_memory out{.offset = offset, .device = a.device};
  std::memcpy(out.handle.data(), &h, sizeof h);
  return out;
}

expected<void*> ipc_open(const std::array<uint8_t, 64>& handle, int32_t device) {
  if (device >= 0)
    if (cudaError_t rc = cudaSetDevice(device); rc != cudaSuccess)
      return runtime_error(fmt::format("cudaSetDevice({})", device), rc);
  cudaIpcMemHandle_t h{};
  std::memcpy(&h, handle.data(), sizeof h);
  void* base = nullptr;
  if (cudaError_t rc = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
      rc != cudaSuccess)
    return runtime_error("cudaIpcOpenMemHandle (GPU memory of another process of this host)", rc);
  return base;
}

expected<void> ipc_close(void* base) {
  if (cudaError_t rc = cudaIpcCloseMemHandle(base); rc != cudaSuccess)
    return runtime_error(fmt::format("cudaIpcCloseMemHandle({})", base), rc);
  return {};
}

const plugin_table table{
    .unavailable_reason = unavailable_reason,
    .make_backend = make_backend,
    .make_sampler = make_sampler,
    .make_nccl_communicator = make_nccl_communicator,
    .make_host_staged_communicator = make_host_staged_communicator,
    .devices = devices,
    .alloc_host = alloc_host,
    .free_host = free_host,
    .copy_all = copy_all,
    .ipc_export = ipc_export,
    .ipc_open = ipc_open,
    .ipc_close = ipc_close,
};

} // namespace
} // namespace troupe::engine::cuda

extern "C" const troupe::engine::cuda::plugin_table* troupe_cuda_plugin() {
  return &troupe::engine::cuda::table;
}
