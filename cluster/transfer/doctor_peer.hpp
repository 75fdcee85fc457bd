// `cluster doctor --serve` / `--peer`: WRITE bandwidth and round trip between two hosts over every
// transport both have. The serving side publishes its endpoints and descriptors on a plain TCP
// side channel and answers each batch's notice with an empty batch (the echo that closes the
// round trip). Blocking; CLI thread.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

// Serves until an unrecoverable error; calls `ready("host:port")` once the side channel listens.
expected<void> serve_measurements(const std::string& host, uint16_t port, uint64_t bytes,
                                  const std::function<void(const std::string&)>& ready);

struct peer_report {
  std::string transport;    // "socket", "tcp", "verbs", ...
  double write_gbps = 0;    // `bytes` batches, each until the peer's echo came back
  double round_trip_us = 0; // median 4 KiB batch → echo
  std::string error;        // non-empty when this transport failed
};
// Measures every transport `peer` (its side channel's host:port) offers, from local address `host`.
expected<std::vector<peer_report>> measure_peer(const std::string& peer, const std::string& host,
                                                uint64_t bytes, int rounds);

} // namespace troupe::cluster::transfer
