// Every control-plane actor message, its CAF 0.17 inspect() function and type registration
// (design.md §2). Included by actors/ and cli/ only: it depends on CAF and on cluster/ types.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/actor_system_config.hpp>
#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

#include "cluster/membership.hpp"

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
           x.rdma_devices, x.gpu_discovery_note);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_info& x) {
  return f(caf::meta::type_name("node_info"), x.node_id, x.address, x.hostname, x.head_node,
           x.resources);
}

} // namespace troupe::cluster

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

// (status_atom, token) -> cluster_view
struct cluster_view {
  std::string head_version;
  std::vector<node_view> nodes;
  std::vector<std::string> kv_namespaces; // one per deployment using the store
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_view& x) {
  return f(caf::meta::type_name("cluster_view"), x.head_version, x.nodes, x.kv_namespaces);
}

// Key-value messages, all carrying the token first:
//   (kv_set_atom, token, ns, key, value) -> bool
//   (kv_get_atom, token, ns, key) -> string | error not_found
//   (kv_wait_atom, token, ns, key, int64 timeout_ms) -> string | error timeout
// Heartbeats: (heartbeat_atom, node_id, session_key) -> bool (false: join again).
// Leave: (leave_atom, node_id, session_key) -> bool. Stop: (stop_atom, token) -> bool.

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
}

} // namespace troupe::msg
