// What `cluster doctor` reports about KV transfer on this host: RDMA devices (ibverbs), memlock and
// rdma_cm hints, and a measured WRITE bandwidth/latency over one provider to itself (loopback).
// Blocking; called from the CLI thread only.
#pragma once

#include <string>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

struct rdma_port_report {
  std::string device;
  int port = 1;
  std::string state;      // "PORT_ACTIVE", ...
  std::string link_layer; // "InfiniBand" or "Ethernet" (RoCE, iWARP/eRDMA)
  int mtu = 0;            // active MTU in bytes
  std::string gid0;       // GID index 0, e.g. "fe80:0000:...", empty when unreadable
};
// Empty when built without rdma-core or when no device exists; `note` says which.
std::vector<rdma_port_report> rdma_ports(std::string& note);

// Environment problems that make RDMA providers fail in confusing ways, one line each.
std::vector<std::string> transfer_hints();

struct loopback_report {
  double write_gbps = 0;       // batches of `bytes`, notice awaited each time
  double small_latency_us = 0; // median post → notice for a 4 KiB batch
  std::string provider;
};
// Connects the provider to itself on `host` and measures. `bytes` ≥ 4096.
expected<loopback_report> measure_loopback(const std::string& provider, const std::string& host,
                                           uint64_t bytes, int rounds);

} // namespace troupe::cluster::transfer
