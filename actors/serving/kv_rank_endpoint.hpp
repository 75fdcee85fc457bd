// One worker rank's end of prefill/decode disaggregation across processes (design.md §6),
// opened by the worker once it has loaded: its KV cache registered with a network transport.
//   decode rank: listens; accepts prefill ranks' connections at any time (a restarted prefill
//     replica links while this one serves) and sends (landed_atom, lease, cancelled) to the
//     decode replica's actor for every batch written into it.
//   prefill rank: links to each decode replica (connects to the decode ranks it writes to,
//     from the layout contract), posts one request's batches per push, and answers each push
//     with (kv_pushed_atom, kv_pushed) from a waiting thread once its batches are done.
// When the transport cannot register the KV memory (GPU KV over a host-only provider, or
// `staging: always`), both ends stage through host memory (cluster/transfer/staging.hpp): a
// prefill rank copies each push into a staging ring and posts from there (a thread of its own,
// in push order); a decode rank publishes a landing area and copies a handoff's landing blocks
// into its cache when the replica asks, (unstage_atom, kv_unstage), answering
// (unstaged_atom, kv_pushed).
// The worker calls it from its own thread; the threads here never block the worker.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor.hpp>

#include "actors/messages.hpp"
#include "actors/serving/kv_net.hpp"
#include "cluster/transfer/kv_handoff.hpp"
#include "cluster/transfer/staging.hpp"

namespace troupe::serve {

struct kv_endpoint_options {
  std::string role;             // decode | prefill
  std::string provider;         // as open_net_transport
  std::string host;             // this node's address
  std::string staging = "auto"; // auto (GPU KV the transport cannot register) | always | never
  int32_t staging_tokens = 0;   // staged: room for this many tokens of KV (> 0)
  // Every rank of both groups on this host (serve::kv_cuda_ipc_host): the socket transport in
  // its CUDA IPC mode, so GPU KV registers and is never staged (provider auto or socket).
  bool cuda_ipc = false;
};

class kv_rank_endpoint {
 public:
  static expected<std::unique_ptr<kv_rank_endpoint>>
  open(const kv_endpoint_options& options, const engine::kv_layout& layout, int32_t rank);
  ~kv_rank_endpoint(); // stops the threads, closes the connections, deregisters

  // What the other group needs to reach this rank (and its layout).
  const msg::kv_rank& describe() const { return self_; }
  std::string provider() const { return net_.transport->name(); }
  // "" when the transport reaches the KV memory, else how it is staged.
  std::string staging() const;

  // Decode: notices go to `target` from now on.
  void notify(caf::actor target);

  // Prefill: (re)links to decode replica `link.decode`; blocks while connecting.
  expected<void> link(const msg::kv_link& link);
  // Prefill: posts this rank's batches of `push`; the answer goes to `reply_to` when they are
  // done (or at once, with the error, when nothing could be posted).
  void push(const msg::kv_push& push, caf::actor reply_to);
  // Prefill: stops the batches of `lease` (they answer as cancelled).
  void cancel(uint64_t lease);
  // Decode, staged: copies a handoff from its landing blocks into the cache; the answer goes to
  // `reply_to`.
  void unstage(msg::kv_unstage job, caf::actor reply_to);

 private:
  kv_rank_endpoint() = default;
  expected<void> register_kv();
  expected<void> open_staging(const kv_endpoint_options& options);
  void accept_loop(std::stop_token stop);
  void listen_loop(std::stop_token stop, std::shared_ptr<cluster::transfer::kv_connection> conn);
  void wait_loop(std::stop_token stop);
  void stage_loop(std::stop_token stop);
  struct to_stage;
  struct pending;
  expected<void> stage_and_post(to_stage& s, uint64_t at, pending& job);
  void unstage_loop(std::stop_token stop);

  using conn_ptr = std::shared_ptr<cluster::transfer::kv_connection>;
  struct pair_link {
    size_t pair = 0; // index into the plan's pairs()
    conn_ptr conn;
    std::vector<cluster::transfer::region_descriptor> remote;
  };
  struct decode_link {
    std::shared_ptr<const cluster::transfer::kv_handoff_plan> plan;
    std::vector<pair_link> pairs; // the pairs this rank sends
  };
  struct pending {
    msg::kv_pushed answer;
    caf::actor reply_to;
    std::vector<std::pair<conn_ptr, cluster::transfer::transfer_id>> batches;
    std::optional<uint64_t> staged_at; // its room in the staging ring
  };
  struct to_stage { // a staged push waiting for its copy-out
    pending job;
    std::vector<std::pair<conn_ptr, cluster::transfer::write_batch>> batches;
    cluster::transfer::clock::time_point deadline;
    bool cancelled = false;
  };

  net_transport net_;
  std::string role_;
  int32_t rank_ = 0;
  engine::kv_layout kv_; // this rank's cache, allocation bases set
  bool on_gpu_ = false;
  std::vector<cluster::transfer::region_id> locals_; // registered: the KV's, or the staging buffer
  msg::kv_rank self_;
  // Staged: the buffer (the prefill side's ring, the decode side's landing area).
  std::optional<cluster::transfer::staging_buffer> staging_;
  std::optional<cluster::transfer::staging_ring> ring_; // prefill
  engine::kv_layout landing_;                           // decode

  std::mutex mu_;
  std::condition_variable_any cv_;
  caf::actor target_;                     // decode: the replica actor
  std::vector<conn_ptr> inbound_;         // decode
  std::map<uint32_t, decode_link> links_; // prefill: by decode replica
  std::deque<pending> queue_;             // prefill: pushes being written, in post order
  std::deque<to_stage> staging_queue_;    // prefill, staged: pushes to copy out, in order
  std::deque<std::pair<msg::kv_unstage, caf::actor>> unstage_queue_; // decode, staged
  std::vector<std::jthread> listeners_; // decode: one per inbound connection
  std::jthread main_;                   // decode: accepting; prefill: waiting for pushes
  std::jthread copier_;                 // staged: prefill copy-out / decode copy-in
};

} // namespace troupe::serve
