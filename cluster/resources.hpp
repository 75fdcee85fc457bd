// What this host offers: CPUs, RAM, GPUs (CUDA runtime when built with CUDA, or CPU stand-ins for
// tests and CPU-only hosts) and RDMA devices (ibverbs when built with rdma-core). Called by the
// node daemon at join and by `cluster status`. Blocking; any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace troupe::cluster {

struct gpu_info {
  int32_t index = 0;
  std::string name;
  uint64_t memory_bytes = 0;
  int32_t cc_major = 0, cc_minor = 0; // compute capability; 0.0 for CPU stand-ins
  bool cpu_standin = false;
};

struct rdma_device_info {
  std::string name;
  int32_t port = 1;
  std::string state;      // "active", "down", ...
  std::string link_layer; // "InfiniBand", "Ethernet"
};

struct host_resources {
  std::string hostname;
  int32_t num_cpus = 0;
  uint64_t memory_bytes = 0;
  std::vector<gpu_info> gpus;
  std::vector<rdma_device_info> rdma_devices;
  std::string gpu_discovery_note; // why no GPUs were found, when none were
  // The running kernel's boot id (/proc/sys/kernel/random/boot_id; "" where there is none):
  // processes that report the same one run on one host (CUDA IPC between them).
  std::string boot_id;
};

// Discovers this host. `cpu_standin_gpus` > 0 adds that many CPU stand-in devices (like
// `ray start --num-gpus`) instead of querying CUDA.
host_resources discover_resources(int32_t cpu_standin_gpus = 0);

// model.yaml's `device: auto`: "cuda" when `gpus` holds a real GPU (CPU stand-ins do not count),
// else "cpu"; `why` says what decided it, for the serve output.
struct device_choice {
  std::string device;
  std::string why;
};
device_choice choose_device(const std::vector<gpu_info>& gpus, const std::string& note);

} // namespace troupe::cluster
