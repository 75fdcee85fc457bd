// The CUDA backend as a plugin: everything that links the CUDA runtime, cuBLASLt or NCCL is built
// into libtroupe_cuda.so, which exports one C symbol (plugin_entry_symbol) returning a table of
// entry points. The engine's seam functions (cuda_backend.hpp, gpu_sampler.hpp, cuda_device.hpp,
// device_communicator.hpp) load it on first use (cuda_plugin_loader.cpp) and forward through the
// table, so `cluster` starts, and serves on CPU, on machines without any CUDA library.
// C++ types cross the boundary: the plugin must come from the same build as the binary, which
// abi_version and the layout sizes in the table check at load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/cuda_device.hpp"
#include "engine/backend/cuda/gpu_sampler.hpp"
#include "engine/comm/cuda_communicators.hpp"

namespace troupe::engine::cuda {

// Bump when the table or a type passed through it changes meaning.
inline constexpr uint32_t plugin_abi_version = 3;
inline constexpr const char* plugin_file = "libtroupe_cuda.so";
inline constexpr const char* plugin_entry_symbol = "troupe_cuda_plugin";

// sizeof of the types that cross the boundary, compared at load (a cheap guard against a plugin
// from another build or another version of the headers).
struct plugin_layout {
  size_t model_config = sizeof(engine::model_config);
  size_t kv_cache_options = sizeof(engine::kv_cache_options);
  size_t cuda_options = sizeof(engine::cuda_options);
  size_t step_plan = sizeof(troupe::step_plan);
  size_t forward_output = sizeof(engine::forward_output);
  size_t nccl_options = sizeof(comm::nccl_options);
  size_t error = sizeof(troupe::error);
  size_t string = sizeof(std::string);
  bool operator==(const plugin_layout&) const = default;
};

struct plugin_table {
  uint32_t abi_version = plugin_abi_version; // first, so that any plugin's can be read
  plugin_layout layout;
  std::string (*unavailable_reason)() = nullptr;
  expected<std::unique_ptr<cuda_backend>> (*make_backend)(const model_config&, const weight_source*,
                                                          kv_cache_options, cuda_options) = nullptr;
  expected<std::unique_ptr<gpu_sampler>> (*make_sampler)() = nullptr;
  expected<std::unique_ptr<comm::device_communicator>> (*make_nccl_communicator)(
      comm::rendezvous_store&, int, int, const comm::nccl_options&) = nullptr;
  expected<std::unique_ptr<comm::device_communicator>> (*make_host_staged_communicator)(
      comm::communicator&) = nullptr;
  expected<std::vector<cuda_device_info>> (*devices)() = nullptr;
  expected<void*> (*alloc_host)(size_t bytes) = nullptr;
  void (*free_host)(void* ptr) = nullptr;
  expected<void> (*copy_all)(std::span<const copy_span> copies) = nullptr;
  expected<cuda_ipc_memory> (*ipc_export)(const void* ptr, size_t bytes) = nullptr;
  expected<void*> (*ipc_open)(const std::array<uint8_t, 64>& handle, int32_t device) = nullptr;
  expected<void> (*ipc_close)(void* base) = nullptr;
};

// The implementations inside the plugin (and in troupe_cuda_static, for the GPU tests and
// benches that call kernels directly); everything else reaches them through the table.
std::string unavailable_reason();
expected<std::unique_ptr<cuda_backend>> make_backend(const model_config& config,
                                                     const weight_source* weights,
                                                     kv_cache_options kv, cuda_options options);
expected<std::unique_ptr<gpu_sampler>> make_sampler();
// make_nccl_communicator, make_host_staged_communicator: engine/comm/cuda_communicators.hpp.

} // namespace troupe::engine::cuda

// The plugin's one exported symbol.
extern "C" const troupe::engine::cuda::plugin_table* troupe_cuda_plugin();
