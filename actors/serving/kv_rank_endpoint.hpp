// One worker rank's end of prefill/decode disaggregation across processes (design.md §6),
// opened by the worker once it has loaded: its KV cache registered with a network transport.
//   decode rank: listens; accepts prefill ranks' connections at any time (a restarted prefill
//     replica links while this one serves) and sends (landed_atom, lease, cancelled) to the
//     decode replica's actor for every batch written into it.
//   prefill rank: links to each decode replica (connects to the decode ranks it writes to,
//     from the layout contract); its pushes go out layer by layer as its backend computes them
//     (layer_pusher, the backend's kv_layer_listener).
// When the transport cannot register the KV memory (GPU KV over a host-only provider, or
// `staging: always`), both ends stage through host memory (cluster/transfer/staging.hpp): a
// prefill rank's pusher copies each part into a staging ring and posts from there; a decode rank
// publishes a landing area and copies a handoff's landing blocks into its cache when the replica
// asks, (unstage_atom, kv_unstage), answering (unstaged_atom, kv_pushed). The worker and its
// backend call it from the worker's thread; nothing here blocks them.
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
#include "actors/serving/layer_pusher.hpp"
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
  const std::string& staging() const { return staging_text_; }

  // Decode: notices go to `target` from now on.
  void notify(caf::actor target);

  // Prefill: (re)links to decode replica `link.decode`; blocks while connecting.
  expected<void> link(const msg::kv_link& link);
  // Prefill: arms `push` (layer_pusher::push); the backend must report its layers to pusher().
  void push(const msg::kv_push& push, caf::actor reply_to);
  // Prefill: stops the push of `lease` (it answers as cancelled).
  void cancel(uint64_t lease);
  // Prefill: what the rank's backend reports its layers to (null on a decode rank).
  std::shared_ptr<layer_pusher> pusher() const { return pusher_; }
  // Decode, staged: copies a handoff from its landing blocks into the cache; the answer goes to
  // `reply_to`.
  void unstage(msg::kv_unstage job, caf::actor reply_to);

 private:
  kv_rank_endpoint() = default;
  expected<void> register_kv();
  expected<void> open_staging(const kv_endpoint_options& options);
  void accept_loop(std::stop_token stop);
  void listen_loop(std::stop_token stop, std::shared_ptr<cluster::transfer::kv_connection> conn);
  void unstage_loop(std::stop_token stop);

  using conn_ptr = std::shared_ptr<cluster::transfer::kv_connection>;

  net_transport net_;
  std::string role_;
  int32_t rank_ = 0;
  engine::kv_layout kv_; // this rank's cache, allocation bases set
  bool on_gpu_ = false;
  std::vector<cluster::transfer::region_id> locals_; // registered: the KV's, or the staging buffer
  msg::kv_rank self_;
  // Staged: the buffer (the decode side's landing area; the prefill side's goes to its pusher)
  // and what it is, for the log.
  std::optional<cluster::transfer::staging_buffer> staging_;
  std::string staging_text_;
  engine::kv_layout landing_;            // decode
  std::shared_ptr<layer_pusher> pusher_; // prefill

  std::mutex mu_;
  std::condition_variable_any cv_;
  caf::actor target_;                                                // decode: the replica actor
  std::vector<conn_ptr> inbound_;                                    // decode
  std::deque<std::pair<msg::kv_unstage, caf::actor>> unstage_queue_; // decode, staged
  std::vector<std::jthread> listeners_; // decode: one per inbound connection
  std::jthread main_;                   // decode: accepting
  std::jthread copier_;                 // decode, staged: copying in
};

} // namespace troupe::serve
