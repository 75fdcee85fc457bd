// A KV transport that peers reach over the network (libfabric's verbs, efa or tcp provider, or
// plain sockets) behind one face: listen, accept, connect. Used to link the replicas of a
// disaggregated deployment, in one process (handoff_links) or across processes (the worker
// ranks' kv_rank_endpoint). Connect and accept block up to their deadline.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>

#include "cluster/transfer/kv_transport.hpp"
#include "runtime/config.hpp"

namespace troupe::serve {

struct net_transport {
  std::shared_ptr<cluster::transfer::kv_transport> transport;
  std::function<expected<std::string>(uint16_t port)> listen; // returns host:port
  std::function<expected<std::unique_ptr<cluster::transfer::kv_connection>>(
      cluster::transfer::clock::time_point deadline)>
      accept;
  std::function<expected<std::unique_ptr<cluster::transfer::kv_connection>>(
      const std::string& address, cluster::transfer::clock::time_point deadline)>
      connect;
};

// `provider`: socket, or a libfabric provider (tcp, verbs, efa; auto = the best of them, as
// fabric_transport picks; sockets in a build
// without libfabric). `host`: the local address to listen on. Errors name why (a provider
// that is absent, a build without libfabric). `cuda_ipc`: the socket transport in its CUDA IPC
// mode (GPU memory registers; provider auto or socket only; errors where CUDA is unusable).
expected<net_transport> open_net_transport(const std::string& provider, const std::string& host,
                                           bool cuda_ipc = false);

// Whether a disaggregated deployment's GPU KV goes device to device by CUDA IPC, decided once
// when it loads from where its ranks run: `device: cuda`, every rank of both groups on one host
// (`rank_hosts`: each rank's node's host_identity(), "" when unknown), provider auto or socket,
// and staging not `always`. Returns that host, or "" (the provider, staging what it must).
std::string kv_cuda_ipc_host(const deployment_config& c, std::span<const std::string> rank_hosts);

} // namespace troupe::serve
