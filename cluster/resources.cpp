#include "cluster/resources.hpp"

#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

#include <fmt/format.h>

#include "engine/backend/cuda/cuda_device.hpp"

#ifdef TROUPE_WITH_RDMA
#include <infiniband/verbs.h>
#endif

namespace troupe::cluster {

namespace {

uint64_t total_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (in >> key) {
    if (key == "MemTotal:") {
      in >> kib;
      return kib * 1024;
    }
    in.ignore(1 << 10, '\n');
  }
  return 0;
}

void discover_gpus(host_resources& r) {
  auto devices = engine::cuda_devices(); // through the CUDA plugin: the reason when it cannot load
  if (!devices) {
    r.gpu_discovery_note = devices.error().message();
    return;
  }
  for (const auto& d : *devices)
    r.gpus.push_back({.index = d.index,
                      .name = d.name,
                      .memory_bytes = d.memory_bytes,
                      .cc_major = d.cc_major,
                      .cc_minor = d.cc_minor});
  if (devices->empty())
    r.gpu_discovery_note = "CUDA reports no devices";
}

void discover_rdma(host_resources& r) {
#ifdef TROUPE_WITH_RDMA
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr)
    return;
  for (int i = 0; i < n; ++i) {
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr)
      continue;
    ibv_port_attr attr{};
    if (ibv_query_port(ctx, 1, &attr) == 0) {
      r.rdma_devices.push_back(
          {.name = ibv_get_device_name(list[i]),
           .port = 1,
           .state = ibv_port_state_str(attr.state),
           .link_layer = attr.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "InfiniBand"});
    }
    ibv_close_device(ctx);
  }
  ibv_free_device_list(list);
#else
  (void)r;
#endif
}

} // namespace

device_choice choose_device(const std::vector<gpu_info>& gpus, const std::string& note) {
  for (const auto& g : gpus)
    if (!g.cpu_standin)
      return {"cuda", fmt::format("GPU {} ({}) found", g.index, g.name)};
  return {"cpu", note.empty() ? std::string("no GPU found") : "no usable GPU: " + note};
}

host_resources discover_resources(int32_t cpu_standin_gpus) {
  host_resources r;
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0)
    r.hostname = name;
  r.num_cpus = static_cast<int32_t>(std::thread::hardware_concurrency());
  r.memory_bytes = total_memory_bytes();
  if (cpu_standin_gpus > 0) {
    for (int32_t i = 0; i < cpu_standin_gpus; ++i)
      r.gpus.push_back({.index = i, .name = "cpu", .memory_bytes = 0, .cpu_standin = true});
  } else {
    discover_gpus(r);
  }
  discover_rdma(r);
  std::getline(std::ifstream("/proc/sys/kernel/random/boot_id"), r.boot_id);
  return r;
}

} // namespace troupe::cluster
