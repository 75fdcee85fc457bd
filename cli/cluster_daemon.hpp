// The daemons behind `cluster start --head` and `cluster join`: daemonising (fork, session log,
// a ready pipe back to the launching command), the CAF actor system with head_actor and/or
// node_actor, and the graceful stop on SIGTERM. Called by cli/cluster_commands.cpp; blocks until
// the daemon is ready (or, with --block, until it stops). Returns the process exit code.
#pragma once

#include <cstdint>
#include <string>

namespace troupe::cli {

struct head_options {
  std::string host; // interface to listen on; empty: all
  uint16_t port = 6380;
  std::string token;     // generated when empty
  std::string ca_dir;    // the cluster CA's folder (ca.pem, ca.key); empty: <temp>/cluster_ca
  int32_t num_gpus = -1; // CPU stand-in GPUs for the head's own node; -1: discover
  bool block = false;
  std::string temp_dir;
  double grace_s = 25; // SIGTERM: requests in flight get this long (`cluster stop` sets its own)
};

struct join_options {
  std::string address; // HOST[:PORT] of the head
  std::string token;
  std::string ca_sha256; // the cluster CA's fingerprint, printed by `cluster start --head`
  std::string node_ip;   // advertised address; empty: the interface that routes to the head
  int32_t num_gpus = -1;
  bool block = false;
  std::string temp_dir;
};

// Exit codes: 0 ok, 1 failure (cannot listen, cannot reach, already running), 3 refused.
int start_head(const head_options& opts);
int join_cluster(const join_options& opts);

} // namespace troupe::cli
