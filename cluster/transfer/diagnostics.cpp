#include "cluster/transfer/diagnostics.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>

#ifdef TROUPE_WITH_RDMA
#include <infiniband/verbs.h>
#endif

#ifdef TROUPE_WITH_FABRIC
#include "cluster/transfer/fabric_transport.hpp"
#endif

namespace troupe::cluster::transfer {

std::vector<rdma_port_report> rdma_ports(std::string& note) {
  std::vector<rdma_port_report> out;
#ifdef TROUPE_WITH_RDMA
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    note = fmt::format("ibv_get_device_list: {} (no RDMA driver or device)", std::strerror(errno));
    return out;
  }
  for (int i = 0; i < n; ++i) {
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx == nullptr)
      continue;
    ibv_device_attr dev{};
    int ports = ibv_query_device(ctx, &dev) == 0 ? dev.phys_port_cnt : 1;
    for (int p = 1; p <= ports; ++p) {
      ibv_port_attr attr{};
      if (ibv_query_port(ctx, static_cast<uint8_t>(p), &attr) != 0)
        continue;
      rdma_port_report r{ibv_get_device_name(list[i]),
                         p,
                         ibv_port_state_str(attr.state),
                         attr.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "InfiniBand",
                         128 << attr.active_mtu,
                         ""};
      if (ibv_gid gid{}; ibv_query_gid(ctx, static_cast<uint8_t>(p), 0, &gid) == 0)
        for (int b = 0; b < 16; b += 2)
          r.gid0 += fmt::format("{}{:02x}{:02x}", b ? ":" : "", gid.raw[b], gid.raw[b + 1]);
      out.push_back(std::move(r));
    }
    ibv_close_device(ctx);
  }
  ibv_free_device_list(list);
  if (n == 0)
    note = "no RDMA device (ibv_get_device_list found none)";
#else
  note = "built without rdma-core (libibverbs-dev)";
#endif
  return out;
}

std::vector<std::string> transfer_hints() {
  std::vector<std::string> hints;
  rlimit lim{};
  if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
      lim.rlim_cur < (uint64_t{1} << 30))
    hints.push_back(fmt::format(
        "memlock limit is {} KiB: RDMA registration of KV pools will fail; raise it (`ulimit -l "
        "unlimited`, LimitMEMLOCK=infinity in systemd, --ulimit memlock=-1 in docker)",
        lim.rlim_cur / 1024));
  if (access("/dev/infiniband", F_OK) == 0 && access("/dev/infiniband/rdma_cm", F_OK) != 0)
    hints.push_back(
        "/dev/infiniband exists but rdma_cm does not: load rdma_ucm (`modprobe rdma_ucm`); "
        "verbs connections go through RDMA_CM");
  if (access("/dev/infiniband/rdma_cm", F_OK) == 0 &&
      access("/dev/infiniband/rdma_cm", R_OK | W_OK) != 0)
    hints.push_back("/dev/infiniband/rdma_cm is not readable and writable by this user");
  return hints;
}

#ifdef TROUPE_WITH_FABRIC
namespace {

struct loop_pair {
  std::unique_ptr<fabric_transport> a, b;
  std::unique_ptr<kv_connection> ab, ba;
};

expected<loop_pair> connect_self(const std::string& provider, const std::string& host) {
  using namespace std::chrono_literals;
  loop_pair p;
  TROUPE_ASSIGN(p.a, fabric_transport::open({.provider = provider, .host = host}));
  TROUPE_ASSIGN(p.b, fabric_transport::open({.provider = provider, .host = host}));
  auto address = p.b->listen(0);
  if (!address)
    return std::move(address).error();
  expected<std::unique_ptr<kv_connection>> accepted = error{errc::internal, "not accepted"};
  std::thread acceptor([&] { accepted = p.b->accept(clock::now() + 10s); });
  auto c = p.a->connect(*address, clock::now() + 10s);
  acceptor.join();
  if (!c)
    return std::move(c).error();
  if (!accepted)
    return std::move(accepted).error();
  p.ab = std::move(*c);
  p.ba = std::move(*accepted);
  return p;
}

// One batch [0, bytes) → [0, bytes), waited until the target's notice; returns seconds.
expected<double> one_batch(loop_pair& p, region_id local, const region_descriptor& remote,
                           uint64_t bytes) {
  using namespace std::chrono_literals;
  auto t0 = clock::now();
  write_batch b{.lease_id = 1, .locals = {local}, .remotes = {remote}};
  b.ranges = {{0, 0, 0, 0, bytes}};
  b.deadline = t0 + 30s;
  auto id = p.ab->post(std::move(b));
  if (!id)
    return std::move(id).error();
  TROUPE_TRY_VOID(p.ab->wait(*id));
  TROUPE_TRY_VOID(p.ba->wait_notice(clock::now() + 30s));
  return std::chrono::duration<double>(clock::now() - t0).count();
}

} // namespace

expected<loopback_report> measure_loopback(const std::string& provider, const std::string& host,
                                           uint64_t bytes, int rounds) {
  bytes = std::max<uint64_t>(bytes, 4096);
  loop_pair p;
  TROUPE_ASSIGN(p, connect_self(provider, host));
  std::vector<uint8_t> src(bytes, 1), dst(bytes, 0);
  region_id s = 0, d = 0;
  TROUPE_ASSIGN(s, p.a->register_memory(src.data(), bytes, memory_kind::host));
  TROUPE_ASSIGN(d, p.b->register_memory(dst.data(), bytes, memory_kind::host));
  region_descriptor remote;
  TROUPE_ASSIGN(remote, p.b->describe(d));
  loopback_report r{.provider = p.a->name()};
  double total = 0;
  for (int i = 0; i < rounds; ++i) {
    double t = 0;
    TROUPE_ASSIGN(t, one_batch(p, s, remote, bytes));
    total += t;
  }
  r.write_gbps = double(bytes) * rounds / total / 1e9;
  std::vector<double> lat;
  for (int i = 0; i < 101; ++i) {
    double t = 0;
    TROUPE_ASSIGN(t, one_batch(p, s, remote, 4096));
    lat.push_back(t * 1e6);
  }
  std::nth_element(lat.begin(), lat.begin() + 50, lat.end());
  r.small_latency_us = lat[50];
  TROUPE_TRY_VOID(p.a->deregister(s));
  TROUPE_TRY_VOID(p.b->deregister(d));
  return r;
}
#else
expected<loopback_report> measure_loopback(const std::string&, const std::string&, uint64_t, int) {
  return make_error(errc::unsupported, "built without libfabric (libfabric-dev)");
}
#endif

} // namespace troupe::cluster::transfer
