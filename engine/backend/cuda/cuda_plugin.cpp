// libtroupe_cuda.so's entry point: the table of what the engine's seam functions forward to
// (cuda_plugin.hpp), and the runtime calls of cuda_device.hpp. Built only into the plugin.
#include "engine/backend/cuda/cuda_plugin.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>

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

const plugin_table table{
    .unavailable_reason = unavailable_reason,
    .make_backend = make_backend,
    .make_sampler = make_sampler,
    .make_nccl_communicator = make_nccl_communicator,
    .make_host_staged_communicator = make_host_staged_communicator,
    .devices = devices,
    .copy = copy,
    .wait_default_stream = wait_default_stream,
};

} // namespace
} // namespace troupe::engine::cuda

extern "C" const troupe::engine::cuda::plugin_table* troupe_cuda_plugin() {
  return &troupe::engine::cuda::table;
}
