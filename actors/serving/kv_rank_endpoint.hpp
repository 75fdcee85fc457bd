// One worker rank's end of prefill/decode disaggregation across processes (design.md §6),
// opened by the worker once it has loaded: its KV cache registered with a network transport.
//   decode rank: listens; accepts prefill ranks' connections at any time (a restarted prefill
//     replica links while this one serves) and sends (landed_atom, lease, cancelled) to the
//     decode replica's actor for every batch written into it.
//   prefill rank: links to each decode replica (connects to the decode ranks it writes to,
//     from the layout contract). A push is armed when its request is added; as the rank's
//     backend reports the layers of the step that completes the prompt (kv_layer_listener), a
//     posting thread sends each layer's writes while the later layers compute (one transfer per
//     decode rank, in parts: the last part carries its notice), and a waiting thread answers
//     the push with (kv_pushed_atom, kv_pushed) once every transfer is done.
// When the transport cannot register the KV memory (GPU KV over a host-only provider, or
// `staging: always`), both ends stage through host memory (cluster/transfer/staging.hpp): a
// prefill rank's posting thread copies each part into a staging ring and posts from there; a
// decode rank publishes a landing area and copies a handoff's landing blocks into its cache when
// the replica asks, (unstage_atom, kv_unstage), answering (unstaged_atom, kv_pushed).
// The worker and its backend call it from the worker's thread; nothing here blocks them.
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
#include "engine/backend/backend.hpp"

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

class kv_rank_endpoint final : public engine::kv_layer_listener {
 public:
  static expected<std::unique_ptr<kv_rank_endpoint>>
  open(const kv_endpoint_options& options, const engine::kv_layout& layout, int32_t rank);
  ~kv_rank_endpoint() override; // stops the threads, closes the connections, deregisters

  // What the other group needs to reach this rank (and its layout).
  const msg::kv_rank& describe() const { return self_; }
  std::string provider() const { return net_.transport->name(); }
  // "" when the transport reaches the KV memory, else how it is staged.
  std::string staging() const;

  // Decode: notices go to `target` from now on.
  void notify(caf::actor target);

  // Prefill: (re)links to decode replica `link.decode`; blocks while connecting.
  expected<void> link(const msg::kv_link& link);
  // Prefill: arms `push`: this rank's share of sequence push.seq's KV goes out during the step
  // that completes its prompt (the backend must report to this endpoint: set_kv_listener). The
  // answer goes to `reply_to` when every batch is done or failed.
  void push(const msg::kv_push& push, caf::actor reply_to);
  // Prefill: stops the push of `lease` (it answers as cancelled).
  void cancel(uint64_t lease);

  // kv_layer_listener (prefill), called by the backend during forward().
  bool step_begins(const step_plan& plan) override;
  void layer_written(int32_t layer, std::function<expected<void>()> written) override;
  void step_ends(bool ok) override;
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
  struct outgoing;
  struct pending;
  void post_loop(std::stop_token stop);
  void post_layers(const std::vector<std::shared_ptr<outgoing>>& group, std::vector<pending>& jobs);
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
  struct pending { // a push whose last parts are posted: the waiting thread answers it
    msg::kv_pushed answer;
    caf::actor reply_to;
    std::vector<std::pair<conn_ptr, cluster::transfer::transfer_id>> batches;
    std::optional<uint64_t> staged_at; // its room in the staging ring
    cluster::transfer::clock::time_point started;
    decode_link link; // where it goes
  };
  struct outgoing { // a push from arming until its last parts are posted
    msg::kv_push spec;
    caf::actor reply_to;
    cluster::transfer::clock::time_point deadline;
    uint64_t step = 0;                   // the step completing its prompt, once it began
    std::vector<int32_t> prefill_blocks; // that step's block table
    std::vector<std::function<expected<void>()>> written; // its layers heard of, in order
    bool step_over = false, step_failed = false, cancelled = false;
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
  std::map<uint64_t, std::shared_ptr<outgoing>> armed_; // prefill: by sequence, step not begun
  std::vector<std::shared_ptr<outgoing>> in_step_;      // prefill: the running step's
  std::deque<std::shared_ptr<outgoing>> posting_;       // prefill: to post, in step order
  std::deque<std::pair<msg::kv_unstage, caf::actor>> unstage_queue_; // decode, staged
  std::vector<std::jthread> listeners_; // decode: one per inbound connection
  std::jthread main_;                   // decode: accepting; prefill: waiting for pushes
  std::jthread copier_;                 // prefill: posting; decode, staged: copying in
};

} // namespace troupe::serve
