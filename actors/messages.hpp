// Every control-plane actor message, its CAF 0.17 inspect() function and type registration
// (design.md §2). Included by actors/ and cli/ only: it depends on CAF and on cluster/ types.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

#include "actors/serving/resolve.hpp"
#include "cluster/membership.hpp"
#include "engine/kv/kv_layout.hpp"
#include "http/serving_port.hpp"
#include "runtime/config.hpp"
#include "runtime/step.hpp"

namespace troupe::cluster {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, gpu_info& x) {
  return f(caf::meta::type_name("gpu_info"), x.index, x.name, x.memory_bytes, x.cc_major,
           x.cc_minor, x.cpu_standin);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rdma_device_info& x) {
  return f(caf::meta::type_name("rdma_device_info"), x.name, x.port, x.state, x.link_layer);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, host_resources& x) {
  return f(caf::meta::type_name("host_resources"), x.hostname, x.num_cpus, x.memory_bytes, x.gpus,
           x.rdma_devices, x.gpu_discovery_note, x.boot_id);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_info& x) {
  return f(caf::meta::type_name("node_info"), x.node_id, x.address, x.hostname, x.head_node,
           x.resources);
}

} // namespace troupe::cluster

namespace troupe {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, parallel_size& x) {
  return f(caf::meta::type_name("parallel_size"), x.tensor, x.pipeline, x.replicas, x.expert);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, http_limits& x) {
  return f(caf::meta::type_name("http_limits"), x.threads, x.max_connections, x.max_header_bytes,
           x.max_body_bytes, x.read_timeout_s, x.idle_timeout_s, x.write_timeout_s);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_group& x) {
  return f(caf::meta::type_name("kv_group"), x.parallel, x.block_size);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, disaggregation_config& x) {
  return f(caf::meta::type_name("disaggregation_config"), x.enabled, x.prefill, x.decode,
           x.provider, x.timeout_s, x.min_prefill_tokens, x.on_prefill_failure, x.staging,
           x.staging_tokens);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, deployment_config& x) {
  return f(caf::meta::type_name("deployment_config"), x.model, x.served_model_name, x.dtype,
           x.device, x.max_model_len, x.max_num_seqs, x.max_num_batched_tokens, x.max_waiting,
           x.gpu_memory_utilization, x.block_size, x.num_kv_blocks, x.prefix_caching, x.seed,
           x.host, x.port, x.api_key, x.open_health_metrics, x.log_stats_interval_s, x.parallel,
           x.http, x.disaggregation);
}

} // namespace troupe

namespace troupe::engine {
// A rank's KV layout travels to the ranks that write into it (allocation bases stay local).
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_layout::allocation& x) {
  return f(caf::meta::type_name("kv_allocation"), x.bytes, x.on_gpu);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_layout::plane& x) {
  return f(caf::meta::type_name("kv_plane"), x.allocation, x.offset);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_layout& x) {
  return f(caf::meta::type_name("kv_layout"), x.dtype, x.elem_bytes, x.num_layers, x.layer_begin,
           x.layer_end, x.num_kv_heads, x.head_begin, x.head_end, x.head_dim, x.block_size,
           x.num_blocks, x.allocations, x.planes);
}
} // namespace troupe::engine

namespace troupe {

// Step plans and results travel from the serving process to every worker rank and back.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling_params& x) {
  return f(caf::meta::type_name("sampling_params"), x.temperature, x.top_p, x.top_k, x.min_p,
           x.repetition_penalty, x.presence_penalty, x.frequency_penalty, x.has_seed, x.seed,
           x.logprobs, x.prompt_logprobs, x.bias_tokens, x.bias_values, x.max_tokens, x.min_tokens,
           x.ignore_eos);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, seq_step& x) {
  return f(caf::meta::type_name("seq_step"), x.id, x.start_pos, x.tokens, x.block_table, x.logits,
           x.sampling, x.num_prompt_tokens, x.first_step, x.cached_prefix, x.next_prompt_token,
           x.banned_tokens, x.allowed_tokens);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_plan& x) {
  return f(caf::meta::type_name("step_plan"), x.step, x.seqs, x.finished);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, position_logprobs& x) {
  return f(caf::meta::type_name("position_logprobs"), x.position, x.token, x.logprob, x.rank,
           x.top_ids, x.top_logprobs);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, seq_output& x) {
  return f(caf::meta::type_name("seq_output"), x.id, x.token, x.logprob, x.top_ids, x.top_logprobs,
           x.prompt_logprobs);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_result& x) {
  return f(caf::meta::type_name("step_result"), x.step, x.outputs);
}

} // namespace troupe

namespace troupe::msg {

// Atoms: verbs of at most 10 characters.
using join_atom = caf::atom_constant<caf::atom("join")>;           // node -> head
using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>; // node -> head
using leave_atom = caf::atom_constant<caf::atom("leave")>;         // node -> head
using status_atom = caf::atom_constant<caf::atom("status")>;       // client -> head
using kv_set_atom = caf::atom_constant<caf::atom("kv_set")>;       // anyone -> head
using kv_get_atom = caf::atom_constant<caf::atom("kv_get")>;
using kv_wait_atom = caf::atom_constant<caf::atom("kv_wait")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;           // local daemon -> head
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;   // head -> nodes
using reconnect_atom = caf::atom_constant<caf::atom("reconnect")>; // node -> itself
using tick_atom = caf::atom_constant<caf::atom("tick")>;           // timers
using deploy_atom = caf::atom_constant<caf::atom("deploy")>;       // client -> head -> serving
using undeploy_atom = caf::atom_constant<caf::atom("undeploy")>;   // client -> head
using spawn_atom = caf::atom_constant<caf::atom("spawn")>;         // serving -> node
using load_atom = caf::atom_constant<caf::atom("load")>;           // serving -> worker
using execute_atom = caf::atom_constant<caf::atom("execute")>;     // serving -> worker
using ready_atom = caf::atom_constant<caf::atom("ready")>;         // serving -> head
using failed_atom = caf::atom_constant<caf::atom("failed")>;       // serving -> head
using drop_atom = caf::atom_constant<caf::atom("drop")>;           // head -> serving
using restart_atom = caf::atom_constant<caf::atom("restart")>;     // head -> serving
using loaded_atom = caf::atom_constant<caf::atom("loaded")>;       // loader -> serving
using linked_atom = caf::atom_constant<caf::atom("linked")>;       // serving -> head
using link_atom = caf::atom_constant<caf::atom("link")>;           // serving -> prefill rank
using push_atom = caf::atom_constant<caf::atom("push")>;           // replica -> prefill rank
using kv_pushed_atom = caf::atom_constant<caf::atom("kv_pushed")>; // prefill rank -> replica
using kv_notify_atom = caf::atom_constant<caf::atom("kv_notify")>; // replica -> decode rank
using landed_atom = caf::atom_constant<caf::atom("landed")>;       // decode rank -> replica
using unstage_atom = caf::atom_constant<caf::atom("unstage")>;     // replica -> decode rank
using unstaged_atom = caf::atom_constant<caf::atom("unstaged")>;   // decode rank -> replica
using submit_atom = caf::atom_constant<caf::atom("submit")>;       // router -> replica
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;       // router -> replica
using step_atom = caf::atom_constant<caf::atom("step")>;           // replica -> itself
using expire_atom = caf::atom_constant<caf::atom("expire")>;       // replica -> itself (timer)
using progress_atom =
    caf::atom_constant<caf::atom("progress")>; // worker -> loader -> head -> client

// (join_atom, join_request) -> join_reply | error (wrong token, version mismatch)
struct join_request {
  std::string token;
  std::string version;
  cluster::node_info info;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_request& x) {
  return f(caf::meta::type_name("join_request"), x.token, x.version, x.info);
}

struct join_reply {
  uint64_t incarnation = 0;
  uint64_t session_key = 0; // carried by every later heartbeat and leave
  int32_t heartbeat_ms = 500;
  std::string head_version;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_reply& x) {
  return f(caf::meta::type_name("join_reply"), x.incarnation, x.session_key, x.heartbeat_ms,
           x.head_version);
}

// One row of `cluster status`.
struct node_view {
  cluster::node_info info;
  std::string state; // alive | dead | left
  uint64_t incarnation = 0;
  int64_t heartbeat_age_ms = 0;
  int64_t up_ms = 0;
  std::string reason;
  int32_t gpus_used = 0;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_view& x) {
  return f(caf::meta::type_name("node_view"), x.info, x.state, x.incarnation, x.heartbeat_age_ms,
           x.up_ms, x.reason, x.gpus_used);
}

// One rank of a deployment as placed by the head.
struct rank_view {
  int32_t pp_rank = 0, tp_rank = 0;
  std::string node_id;
  int32_t device = 0;
  int32_t replica = 0;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rank_view& x) {
  return f(caf::meta::type_name("rank_view"), x.pp_rank, x.tp_rank, x.node_id, x.device, x.replica);
}

// One group of a disaggregated deployment's replicas, for `cluster status`.
struct group_view {
  std::string role; // decode | prefill
  int32_t tensor = 1, pipeline = 1, replicas = 1;
  int32_t first_replica = 0; // its replicas are [first_replica, first_replica + replicas)
  int32_t ready = 0;         // of them, serving
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_view& x) {
  return f(caf::meta::type_name("group_view"), x.role, x.tensor, x.pipeline, x.replicas,
           x.first_replica, x.ready);
}
// One deployment row of `cluster status`. state: loading | ready | degraded | failed.
struct deployment_view {
  std::string name;
  std::string state;
  std::string endpoint; // http://host:port/v1 once ready
  std::string reason;   // why degraded or failed
  int32_t tensor = 1, pipeline = 1;
  std::vector<rank_view> ranks; // the ranks holding devices, (replica, pp, tp) order
  int32_t replicas = 1;
  std::vector<std::string> replica_states; // loading | ready | failed | waiting | restarting
  int32_t restarts = 0;                    // replicas restarted since it was first ready
  std::string device;                      // cpu | cuda (model.yaml's auto resolved)
  std::vector<group_view> groups;          // disaggregated: decode and prefill; else empty
  std::string transfer; // disaggregated: the KV transfer provider and layout contract
  // Ranks still reading their weights (first load or a restart): one progress line each.
  std::vector<std::string> loading;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, deployment_view& x) {
  return f(caf::meta::type_name("deployment_view"), x.name, x.state, x.endpoint, x.reason, x.tensor,
           x.pipeline, x.ranks, x.replicas, x.replica_states, x.restarts, x.device, x.groups,
           x.transfer, x.loading);
}

// (status_atom, token) -> cluster_view
struct cluster_view {
  std::string head_version;
  std::vector<node_view> nodes;
  std::vector<std::string> kv_namespaces; // one per deployment using the store
  std::vector<deployment_view> deployments;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_view& x) {
  return f(caf::meta::type_name("cluster_view"), x.head_version, x.nodes, x.kv_namespaces,
           x.deployments);
}

// `cluster serve` (client -> head): (deploy_atom, token, deployment_config) -> deployment_view
// (state ready, endpoint) | error (duplicate name, placement reason, load failure). The head
// then sends (deploy_atom, deployment_plan) -> string endpoint | error to the deployment's
// serving actor in its own process. (undeploy_atom, token, name) -> bool | error not_found.
// One replica's ranks: a tensor x pipeline group with its own namespace in the head's KV store
// (Gloo/NCCL rendezvous), so that groups of different replicas and attempts never meet.
struct replica_plan {
  int32_t replica = 0;
  std::string ns;
  std::vector<rank_view> ranks;   // world rank order: pp_rank * tensor + tp_rank
  std::vector<caf::actor> nodes;  // the node_actor hosting each rank
  std::vector<std::string> hosts; // each rank's node's cluster::host_identity ("" unknown)
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, replica_plan& x) {
  return f(caf::meta::type_name("replica_plan"), x.replica, x.ns, x.ranks, x.nodes, x.hosts);
}
// Head -> serving actor, within the head's process only (never serialized): the deployment as
// resolved before placing it (serve::resolve), and where its replicas' ranks are.
struct deployment_plan {
  std::shared_ptr<const serve::resolved_deployment> resolved;
  std::string ns; // the deployment's namespace prefix in the head's KV store
  std::vector<replica_plan> replicas;
};
// Failure and restart of one replica (the head's registry decides, the serving actor acts):
//   (failed_atom, name, ns, why)         serving -> head: the replica of attempt `ns` failed
//   (drop_atom, int32 replica, ns, why)   head -> serving: take it out of routing, stop its workers
//   (restart_atom, replica_plan) -> string ns | error   head -> serving: spawn, load, swap in
//   (loaded_atom, replica_loaded)         a replica's loader -> serving (its own process)
// Prefill/decode disaggregation across processes (design.md §6). A rank of either group opens
// a KV transport when it loads, registers its KV cache and answers with its kv_rank; a decode
// rank listens and accepts connections from prefill ranks at any time. The serving actor links
// every prefill replica to every decode replica: (link_atom, kv_link) to each prefill rank,
// which connects to the decode ranks it writes to -> worker_reply (error empty: linked). A
// prefill replica's actor has its ranks push one request's KV: (push_atom, kv_push), sent when
// the request is added (before any plan holding it), arms the push; each rank sends its layers
// while the step completing the prompt computes the later ones, and answers (kv_pushed_atom,
// kv_pushed) once its batches completed or failed; (cancel_atom, uint64 lease) stops them (an
// armed push answers as cancelled). A decode replica's actor registers with its ranks,
// (kv_notify_atom), and each rank sends it (landed_atom, uint64 lease, bool cancelled) for every
// batch written into it. A decode rank whose KV the transport cannot reach (GPU memory over a
// host-only provider) publishes a landing area instead (landing_blocks > 0): prefill ranks write
// into landing blocks the replica reserved, and once every notice came the replica has its ranks
// copy them into the cache, (unstage_atom, kv_unstage) -> (unstaged_atom, kv_pushed).
struct kv_rank {
  std::string endpoint;                      // endpoint_address::serialize(); "" for prefill
  std::vector<std::vector<uint8_t>> regions; // region_descriptor::serialize(), per allocation
  engine::kv_layout layout;                  // allocation bases are not sent
  int32_t landing_blocks = 0;                // decode: > 0 when `layout` is the landing area
};
struct kv_link {
  uint32_t decode = 0;          // the decode replica's index
  std::vector<kv_rank> prefill; // every rank of the prefill replica, world rank order
  std::vector<kv_rank> ranks;   // every rank of the decode replica, world rank order
};
struct kv_push {
  uint64_t lease = 0;
  uint32_t decode = 0; // which link
  uint64_t seq = 0;    // the prefill replica's engine id (its block table comes with the step)
  std::vector<int32_t> decode_blocks;
  int32_t begin = 0, end = 0; // prompt positions to move
  int64_t timeout_ms = 0;     // from receipt (clocks of hosts differ)
};
struct kv_unstage {
  uint64_t lease = 0;
  std::vector<int32_t> landing_blocks, blocks; // by position / block_size
  int32_t begin = 0, end = 0;                  // prompt positions to copy
};
struct kv_pushed {
  uint64_t lease = 0;
  int32_t rank = 0;
  std::string error; // empty: every batch of this rank completed
  bool cancelled = false;
  uint64_t bytes = 0, writes = 0;
  double seconds = 0; // from the first write posted to the last one done
};

// CAF 0.17 loads a std::vector<uint8_t> by resizing it to the length the peer claims (up to
// 4 GiB, from a 20-byte message: found by fuzz/caf_message.cpp) before reading the bytes. As
// int8_t elements they are read one by one, so a forged length fails at the end of the message.
// The bytes on the wire are the same.
struct int8_rows {
  explicit int8_rows(const std::vector<std::vector<uint8_t>>& from) {
    for (const auto& r : from)
      rows.emplace_back(r.begin(), r.end());
  }
  void copy_to(std::vector<std::vector<uint8_t>>& to) const {
    to.clear();
    for (const auto& r : rows)
      to.emplace_back(r.begin(), r.end());
  }
  std::vector<std::vector<int8_t>> rows;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_rank& x) {
  int8_rows regions(x.regions);
  if constexpr (std::is_void_v<typename Inspector::result_type>) {
    f(caf::meta::type_name("kv_rank"), x.endpoint, regions.rows, x.layout, x.landing_blocks);
    regions.copy_to(x.regions);
  } else {
    auto result =
        f(caf::meta::type_name("kv_rank"), x.endpoint, regions.rows, x.layout, x.landing_blocks);
    regions.copy_to(x.regions);
    return result;
  }
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_link& x) {
  return f(caf::meta::type_name("kv_link"), x.decode, x.prefill, x.ranks);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_push& x) {
  return f(caf::meta::type_name("kv_push"), x.lease, x.decode, x.seq, x.decode_blocks, x.begin,
           x.end, x.timeout_ms);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_unstage& x) {
  return f(caf::meta::type_name("kv_unstage"), x.lease, x.landing_blocks, x.blocks, x.begin, x.end);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_pushed& x) {
  return f(caf::meta::type_name("kv_pushed"), x.lease, x.rank, x.error, x.cancelled, x.bytes,
           x.writes, x.seconds);
}

struct replica_loaded {
  int32_t replica = 0;
  std::string ns;
  std::vector<caf::actor> workers; // world rank order; empty on error
  int32_t kv_blocks = 0;           // the smallest rank's KV pool
  std::string error;               // empty: loaded
  std::vector<kv_rank> kv;         // disaggregated: each rank's, world rank order
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, replica_loaded& x) {
  return f(caf::meta::type_name("replica_loaded"), x.replica, x.ns, x.workers, x.kv_blocks, x.error,
           x.kv);
}

// (spawn_atom, worker_spec) -> caf::actor (serving -> node_actor): a detached worker_actor for
// one rank; it rendezvouses through the head's KV store under `ns` when loaded.
struct worker_spec {
  std::string deployment;
  std::string ns;
  std::string model;
  int32_t tp_rank = 0, tp_size = 1, pp_rank = 0, pp_size = 1;
  int32_t ep_size = 0; // parallel.expert (0: tp_size)
  int32_t device = 0;
  int32_t num_blocks = 0, block_size = 16;
  int64_t comm_timeout_ms = 10000; // Gloo rendezvous and collectives: a dead peer fails by then
  // How long a pipeline stage waits for the previous stage's hidden states: a whole step of that
  // stage (a long CPU prefill), not just the skew of a collective. A dead stage is noticed
  // sooner: the serving actor sees its worker go down.
  static constexpr int64_t stage_wait_ms = 120000;
  std::string backend = "cpu"; // model.yaml's device: cpu (Gloo) | cuda (NCCL)
  // cuda sizing; num_blocks 0 = the KV pool takes what gpu_memory_utilization leaves
  int32_t max_model_len = 0, max_num_seqs = 0, max_num_batched_tokens = 0;
  float gpu_memory_utilization = 0.9f;
  // Disaggregated deployments: this rank's group ("decode" | "prefill"; "" colocated) and the
  // KV transport it opens (auto | tcp | verbs | efa | socket), and whether KV is staged through
  // host memory (auto | always | never) with room for how many tokens.
  std::string kv_role;
  std::string kv_provider;
  std::string kv_staging = "auto";
  int32_t kv_staging_tokens = 0;
  // Every rank of both groups on this host with GPU KV (serve::kv_cuda_ipc_host): the KV goes
  // device to device by CUDA IPC over the socket transport, never staged.
  bool kv_cuda_ipc = false;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_spec& x) {
  return f(caf::meta::type_name("worker_spec"), x.deployment, x.ns, x.model, x.tp_rank, x.tp_size,
           x.pp_rank, x.pp_size, x.ep_size, x.device, x.num_blocks, x.block_size, x.comm_timeout_ms,
           x.backend, x.max_model_len, x.max_num_seqs, x.max_num_batched_tokens,
           x.gpu_memory_utilization, x.kv_role, x.kv_provider, x.kv_staging, x.kv_staging_tokens,
           x.kv_cuda_ipc);
}

// Worker answers: (load_atom) -> worker_reply; (execute_atom, ticket, step_plan) ->
// worker_reply with that ticket (the remote executor's submission number: plans of several
// scheduler lanes may share a step number).
struct worker_reply {
  int32_t rank = 0;    // world rank
  uint64_t ticket = 0; // the plan's ticket (0 for load)
  std::string error;   // empty: ok
  step_result result;
  int32_t kv_blocks = 0; // load: the size of this rank's KV pool
  kv_rank kv;            // load, disaggregated: where its KV is
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_reply& x) {
  return f(caf::meta::type_name("worker_reply"), x.rank, x.ticket, x.error, x.result, x.kv_blocks,
           x.kv);
}

// Load progress of one rank: (progress_atom, rank_progress), a worker's while it reads its
// weights (at most every 250 ms, and once at the end with done) to the sender of its load_atom
// (the replica's loader), which names the replica and node and sends it on to the head as the
// serving actor; the head sends it to the `cluster serve` client that waits on the deployment
// and keeps the last report of each rank still loading for `cluster status`.
struct rank_progress {
  std::string deployment;
  std::string role;    // the group: "" (not disaggregated) | "decode" | "prefill"
  int32_t replica = 0; // the replica's index within its group
  int32_t rank = 0;    // world rank within the replica
  int32_t tp_rank = 0, pp_rank = 0;
  std::string node_id;  // where the rank runs ("" in a `--block` process)
  uint64_t bytes = 0;   // weight bytes read so far
  uint64_t total = 0;   // this rank's total (its shard, not the whole checkpoint)
  double elapsed_s = 0; // since the rank began reading
  bool done = false;    // the last report of this load
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rank_progress& x) {
  return f(caf::meta::type_name("rank_progress"), x.deployment, x.role, x.replica, x.rank,
           x.tp_rank, x.pp_rank, x.node_id, x.bytes, x.total, x.elapsed_s, x.done);
}

// (submit_atom, replica_job) router -> replica actor, in one process only (never serialized):
// the request's outputs go to `sink`, its errors to sink->fail(). `id` is the router's id,
// which (cancel_atom, seq_id id) names.
struct replica_job {
  seq_id id = 0;
  engine::request request;
  std::shared_ptr<serve::request_sink> sink;
  // OpenAI `n` > 1: the other choices of the same prompt (each with its own id and sink), admitted
  // with this one into one lane so that they share the prompt's KV blocks.
  std::vector<replica_job> siblings;
};

// Key-value messages, all carrying the token first:
//   (kv_set_atom, token, ns, key, value) -> bool
//   (kv_get_atom, token, ns, key) -> string | error not_found
//   (kv_wait_atom, token, ns, key, int64 timeout_ms) -> string | error timeout
// Heartbeats: (heartbeat_atom, node_id, session_key) -> bool (false: join again).
// Leave: (leave_atom, node_id, session_key) -> bool. Stop: (stop_atom, token, grace_s) -> bool
// (the deployments drain for up to grace_s first; head -> serving actor: (stop_atom, grace_s)).

// Registers every type above with a CAF config; both ends of a connection must call it.
inline void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<cluster::gpu_info>("troupe::gpu_info");
  cfg.add_message_type<cluster::rdma_device_info>("troupe::rdma_device_info");
  cfg.add_message_type<cluster::host_resources>("troupe::host_resources");
  cfg.add_message_type<cluster::node_info>("troupe::node_info");
  cfg.add_message_type<join_request>("troupe::join_request");
  cfg.add_message_type<join_reply>("troupe::join_reply");
  cfg.add_message_type<node_view>("troupe::node_view");
  cfg.add_message_type<cluster_view>("troupe::cluster_view");
  cfg.add_message_type<rank_view>("troupe::rank_view");
  cfg.add_message_type<std::vector<rank_view>>("std::vector<troupe::rank_view>");
  cfg.add_message_type<deployment_view>("troupe::deployment_view");
  cfg.add_message_type<deployment_config>("troupe::deployment_config");
  cfg.add_message_type<replica_plan>("troupe::replica_plan");
  cfg.add_message_type<replica_loaded>("troupe::replica_loaded");
  cfg.add_message_type<worker_spec>("troupe::worker_spec");
  cfg.add_message_type<worker_reply>("troupe::worker_reply");
  cfg.add_message_type<step_plan>("troupe::step_plan");
  cfg.add_message_type<step_result>("troupe::step_result");
  cfg.add_message_type<group_view>("troupe::group_view");
  cfg.add_message_type<kv_rank>("troupe::kv_rank");
  cfg.add_message_type<kv_link>("troupe::kv_link");
  cfg.add_message_type<kv_push>("troupe::kv_push");
  cfg.add_message_type<kv_pushed>("troupe::kv_pushed");
  cfg.add_message_type<kv_unstage>("troupe::kv_unstage");
  cfg.add_message_type<rank_progress>("troupe::rank_progress");
}

} // namespace troupe::msg

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::msg::replica_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe::msg::deployment_plan)
