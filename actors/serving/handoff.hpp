// Prefill/decode disaggregation inside the replica actors (design.md §6). A decode replica
// reserves blocks for a request's prompt and asks a prefill replica to fill them; the prefill
// replica prefills, pushes the prompt's KV into the reserved blocks over a kv_connection layer by
// layer while the prefill runs (layer_pusher: one-sided writes from kv_handoff_plan, one notice
// per decode rank) and hands the first token over; the decode replica starts decoding once the
// first token and the completion notices (the data is in place) have all arrived. Every handoff is
// a lease named by the router's request id: its deadline, a cancel, a failed transfer or a failed
// prefill frees the blocks on both sides (the decode side's only once nothing can write them any
// more) and either prefills on the decode replica or ends the request with the error, as
// configured.
//
// Messages (one process; never serialized):
//   (import_atom, handoff_job)      router -> decode replica
//   (prefill_atom, export_job)      decode -> prefill replica
//   (handed_atom, handoff_result)   prefill -> decode replica: the first token, or why not
//   (abort_atom, lease)             decode -> prefill replica: stop (cancel, deadline)
//   (landed_atom, lease, cancelled) a decode replica's notice listener -> itself
//   (kv_pushed_atom, kv_pushed)     a prefill replica's pusher(s) -> itself (messages.hpp)
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>

#include "actors/messages.hpp"
#include "actors/serving/layer_pusher.hpp"
#include "cluster/transfer/kv_handoff.hpp"
#include "cluster/transfer/kv_transport.hpp"
#include "engine/scheduler/scheduler.hpp"
#include "http/metrics.hpp"
#include "http/serving_port.hpp"

namespace troupe::serve {

using import_atom = caf::atom_constant<caf::atom("import")>;
using prefill_atom = caf::atom_constant<caf::atom("prefill")>;
using handed_atom = caf::atom_constant<caf::atom("handed")>;
using abort_atom = caf::atom_constant<caf::atom("abort")>;
using landed_atom = msg::landed_atom;
using lease_atom = caf::atom_constant<caf::atom("lease")>;

// What the deployment's handoffs did, for /metrics; shared by its replicas, thread-safe.
struct handoff_stats {
  std::string provider; // the transport's name ("tcp", "local", ...)
  std::atomic<uint64_t> handoffs{0}, bytes{0}, writes{0};
  std::atomic<uint64_t> failed{0};         // transfers or prefills that failed
  std::atomic<uint64_t> expired{0};        // leases past their deadline
  std::atomic<uint64_t> local_prefills{0}; // prefilled on the decode replica instead
  std::atomic<uint64_t> retried{0};        // tried again on another prefill replica
  histogram transfer_seconds;              // post to completion, per handoff
  std::string text(const std::string& model) const;
};

// The router's request, to a decode replica, with the prefill replica it should use.
struct handoff_job {
  seq_id id = 0; // the router's id; also the lease id
  engine::request request;
  std::shared_ptr<request_sink> sink;
  caf::actor prefill;
  std::vector<caf::actor> fallbacks; // the other prefill replicas, tried in turn when it fails
};

// A decode replica's reservation, to the prefill replica.
struct export_job {
  uint64_t lease = 0;
  engine::request request; // handoff = export_kv; sampling with its seed fixed
  std::vector<int32_t> blocks;
  int32_t cached_tokens = 0;
  uint32_t decode_index = 0;
  caf::actor decode;
  std::chrono::steady_clock::time_point deadline;
};

struct handoff_result {
  uint64_t lease = 0;
  troupe::error failure; // errc::ok: `first` is valid and the KV was written
  seq_output first;
  uint64_t bytes = 0;
};

struct push_result {
  seq_id id = 0; // the prefill replica's engine id
  troupe::error failure;
  uint64_t bytes = 0, writes = 0;
  double seconds = 0;
};

// A prefill replica's part. In one process: its transport and its pusher (linked to every
// decode replica; owned by the replica's backend, which reports its layers to it). Over worker
// ranks: the ranks that push (each its own pusher, in its kv_rank_endpoint).
struct prefill_role {
  std::shared_ptr<cluster::transfer::kv_transport> transport;
  std::weak_ptr<layer_pusher> pusher; // in one process
  std::vector<size_t> pushers;        // worker ranks with something to send
  std::shared_ptr<handoff_stats> stats;
  size_t pushing_ranks() const { return pushers.empty() ? 1 : pushers.size(); }
};

// A decode replica's part: the links prefill replicas write through (their notices), and the
// policy.
struct decode_role {
  uint32_t index = 0; // among the decode replicas
  std::shared_ptr<cluster::transfer::kv_transport> transport;
  std::vector<std::shared_ptr<cluster::transfer::kv_connection>> inbound; // in one process
  // Completion notices per handoff: one per (prefill rank, decode rank) pair of the contract.
  // Over worker ranks they come from the ranks (landed_atom), which the replica registers with.
  uint32_t notices = 1;
  // > 0: the ranks stage KV through a landing area of this many blocks (msg::kv_rank); the
  // replica reserves landing blocks for each handoff and has its ranks copy them into the cache.
  int32_t landing_blocks = 0;
  std::chrono::milliseconds timeout{10000};
  int32_t min_prefill_tokens = 0;
  bool prefill_on_failure = true; // else the request ends with the error
  std::shared_ptr<handoff_stats> stats;
};

// A handoff attempt's lease: the router's request id and the attempt. A retry on another
// prefill replica gets a new lease, so nothing of the failed attempt (a late notice or answer)
// can touch the new one.
constexpr uint64_t lease_of(uint64_t request, uint32_t attempt) {
  return (request << 8) | (attempt & 0xff);
}
constexpr uint32_t max_attempts = 0xff;

// Decode replica `index`'s role under `config` (timeout, policy), expecting `notices` completion
// notices per handoff.
std::shared_ptr<decode_role> make_decode_role(const disaggregation_config& config, uint32_t index,
                                              uint32_t notices,
                                              std::shared_ptr<handoff_stats> stats);

// Sends (landed_atom, lease, cancelled) to `target` for every completion notice arriving on
// `conn`, on a thread of its own, until destroyed.
class notice_listener {
 public:
  notice_listener(std::shared_ptr<cluster::transfer::kv_connection> conn, caf::actor target);
  ~notice_listener();

 private:
  std::jthread thread_;
};

} // namespace troupe::serve

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::serve::handoff_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::serve::export_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::serve::handoff_result)
