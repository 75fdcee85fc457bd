// One prefill rank's pushes (design.md §6): each armed when its request enters the prefill
// replica's scheduler, then sent layer by layer as the rank's backend reports the layers of the
// step that completes the prompt (this is the backend's kv_layer_listener): a posting thread
// sends each layer of the step's pushes as soon as it is written (waiting for the GPU first),
// one parted_transfer per (push, decode rank) whose last part carries the notice, staged
// through a ring of host memory when the transport cannot reach the KV; a waiting thread
// answers each push with (kv_pushed_atom, kv_pushed) once its transfers are done. Used by
// worker ranks (kv_rank_endpoint) and by prefill replicas in one process (handoff_links).
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <caf/actor.hpp>

#include "actors/messages.hpp"
#include "cluster/transfer/kv_handoff.hpp"
#include "cluster/transfer/staging.hpp"
#include "engine/backend/backend.hpp"

namespace troupe::serve {

class layer_pusher final : public engine::kv_layer_listener {
 public:
  using conn_ptr = std::shared_ptr<cluster::transfer::kv_connection>;
  struct pair_link {
    size_t pair = 0; // index into the plan's pairs()
    conn_ptr conn;
    std::vector<cluster::transfer::region_descriptor> remote;
  };
  struct decode_link {
    std::shared_ptr<const cluster::transfer::kv_handoff_plan> plan;
    std::vector<pair_link> pairs;    // the pairs this rank sends
    std::shared_ptr<void> keepalive; // in one process: what owns the decode side's KV memory
  };
  // A staged rank's buffer, registered as `region` (its pushes write from there).
  struct staging_area {
    cluster::transfer::staging_buffer buffer;
    cluster::transfer::region_id region = 0;
  };

  // `kv`: the rank's cache (allocation bases set); `locals`: its KV registrations (unused when
  // staged); `rank`: its world rank in the prefill replica (the contract's prefill rank).
  layer_pusher(engine::kv_layout kv, std::vector<cluster::transfer::region_id> locals, int32_t rank,
               std::optional<staging_area> staged);
  ~layer_pusher() override; // cancels what is in flight and stops the threads

  // (Re)links to decode replica `decode`.
  void link(uint32_t decode, decode_link link);
  // Arms `push`: this rank's share of sequence push.seq's KV goes out during the step that
  // completes its prompt. The answer goes to `reply_to` when every transfer is done or failed.
  void push(const msg::kv_push& push, caf::actor reply_to);
  // Stops the push of `lease` (it answers as cancelled).
  void cancel(uint64_t lease);

  // kv_layer_listener, called by the rank's backend during forward().
  bool step_begins(const step_plan& plan) override;
  void layer_written(int32_t layer, std::function<expected<void>()> written) override;
  void step_ends(bool ok) override;

 private:
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
  void post_loop(std::stop_token stop);
  void post_layers(const std::vector<std::shared_ptr<outgoing>>& group, std::vector<pending>& jobs);
  void wait_loop(std::stop_token stop);

  engine::kv_layout kv_;
  std::vector<cluster::transfer::region_id> locals_;
  int32_t rank_ = 0;
  bool on_gpu_ = false;
  std::optional<staging_area> staging_;
  std::optional<cluster::transfer::staging_ring> ring_;

  std::mutex mu_;
  std::condition_variable_any cv_;
  std::map<uint32_t, decode_link> links_;               // by decode replica
  std::map<uint64_t, std::shared_ptr<outgoing>> armed_; // by sequence, step not begun
  std::vector<std::shared_ptr<outgoing>> in_step_;      // the running step's
  std::deque<std::shared_ptr<outgoing>> posting_;       // to post, in step order
  std::deque<pending> queue_;                           // being written, in post order
  std::jthread waiter_, poster_;
};

} // namespace troupe::serve
