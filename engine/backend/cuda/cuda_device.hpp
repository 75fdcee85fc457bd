// The few CUDA runtime calls that code outside the CUDA backend needs (GPU discovery for
// cluster/resources, device copies for the local KV transport), as plain C++ so that callers need
// neither the CUDA headers nor the CUDA libraries: they go through the CUDA plugin
// (cuda_plugin.hpp) and fail with the reason when it cannot load or the build has no CUDA.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine {

struct cuda_device_info {
  int index = 0;
  std::string name;
  uint64_t memory_bytes = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

// Every CUDA device this process sees (possibly none); an error says why CUDA cannot be asked
// (built without CUDA, the plugin or a CUDA library missing, the driver's error).
expected<std::vector<cuda_device_info>> cuda_devices();

// Page-locked host memory (cudaHostAlloc): what GPU KV is staged through for a transport that
// registers host memory only. Freed with cuda_free_host.
expected<void*> cuda_alloc_host(size_t bytes);
void cuda_free_host(void* ptr);

struct copy_span {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};
// Runs every copy (either side host or device memory) on a non-blocking stream of the calling
// thread, on the device the first copy's device side belongs to, and waits for all of them. Not
// ordered with any other stream: callers copy only memory no kernel uses meanwhile.
expected<void> cuda_copy_all(std::span<const copy_span> copies);

// CUDA IPC (legacy cudaIpc* handles): GPU memory of one process written by another process of the
// same host. The exporter describes the cudaMalloc allocation `ptr` lies in; the importer maps it
// once (cuda_ipc_open) and copies into base + offset with cuda_copy_all.
struct cuda_ipc_memory {
  std::array<uint8_t, 64> handle{}; // cudaIpcMemHandle_t of the allocation
  uint64_t offset = 0;              // of `ptr` from the allocation's base
  int32_t device = 0;               // the allocation's device, in the exporter's numbering
};
// Errors: host memory, memory not from cudaMalloc (no IPC handle), [ptr, ptr + bytes) not inside
// one allocation.
expected<cuda_ipc_memory> cuda_ipc_export(const void* ptr, size_t bytes);
// Maps an exported allocation into this process with peer access enabled lazily, on `device`
// (this process's numbering; -1: the calling thread's current device), returning its base. The
// same handle opened twice in one process is mapped once (reference counted). Fails for a handle
// exported by this very process.
expected<void*> cuda_ipc_open(const std::array<uint8_t, 64>& handle, int32_t device);
// Unmaps what cuda_ipc_open returned (one reference).
expected<void> cuda_ipc_close(void* base);

} // namespace troupe::engine
