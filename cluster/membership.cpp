#include "cluster/membership.hpp"

namespace troupe::cluster {

std::string_view to_string(node_state s) {
  switch (s) {
  case node_state::alive:
    return "alive";
  case node_state::dead:
    return "dead";
  case node_state::left:
    return "left";
  }
  return "unknown";
}

std::string host_identity(const node_info& n) {
  return n.resources.boot_id.empty() ? std::string() : n.hostname + "/" + n.resources.boot_id;
}

bool tokens_equal(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

membership::membership(std::string token, std::string version, membership_options options)
  : token_(std::move(token)), version_(std::move(version)), options_(options) {}

expected<void> membership::authorize(const std::string& token) const {
  if (!tokens_equal(token, token_))
    return make_error(errc::invalid_argument,
                      "authentication failed: wrong cluster token (pass the head's --token)");
  return {};
}

expected<node_record> membership::join(const std::string& token, const std::string& version,
                                       const node_info& info, uint64_t session_key,
                                       clock::time_point now) {
  if (!tokens_equal(token, token_))
    return make_error(errc::invalid_argument,
                      "authentication failed: node {} ({}) presented a wrong cluster token",
                      info.node_id, info.address);
  if (version != version_)
    return make_error(errc::unsupported,
                      "version mismatch: head runs troupe {}, node {} ({}) runs troupe {}",
                      version_, info.node_id, info.address, version);
  if (info.node_id.empty())
    return make_error(errc::invalid_argument, "join from {}: empty node id", info.address);
  auto [it, fresh] = nodes_.try_emplace(info.node_id);
  node_record& r = it->second;
  const int32_t used = fresh ? 0 : r.gpus_used;
  const uint64_t incarnation = r.incarnation + 1;
  r = node_record{.info = info,
                  .state = node_state::alive,
                  .incarnation = incarnation,
                  .session_key = session_key,
                  .joined_at = now,
                  .last_heartbeat = now,
                  .gpus_used = used};
  return r;
}

heartbeat_result membership::heartbeat(const std::string& node_id, uint64_t session_key,
                                       clock::time_point now) {
  auto it = nodes_.find(node_id);
  if (it == nodes_.end() || it->second.session_key != session_key ||
      it->second.state != node_state::alive)
    return heartbeat_result::rejoin;
  it->second.last_heartbeat = now;
  return heartbeat_result::ok;
}

bool membership::connection_lost(const std::string& node_id, uint64_t incarnation,
                                 const std::string& why) {
  auto it = nodes_.find(node_id);
  if (it == nodes_.end() || it->second.incarnation != incarnation ||
      it->second.state != node_state::alive)
    return false;
  it->second.state = node_state::dead;
  it->second.reason = why;
  return true;
}

bool membership::leave(const std::string& node_id, uint64_t session_key) {
  auto it = nodes_.find(node_id);
  if (it == nodes_.end() || it->second.session_key != session_key ||
      it->second.state != node_state::alive)
    return false;
  it->second.state = node_state::left;
  it->second.reason = "stopped by cluster stop";
  return true;
}

std::vector<std::string> membership::expire(clock::time_point now) {
  std::vector<std::string> dead;
  for (auto& [id, r] : nodes_) {
    if (r.state == node_state::alive && now - r.last_heartbeat > options_.dead_after) {
      r.state = node_state::dead;
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - r.last_heartbeat);
      r.reason = fmt::format("no heartbeat for {} ms", ms.count());
      dead.push_back(id);
    }
  }
  return dead;
}

const node_record* membership::find(const std::string& node_id) const {
  auto it = nodes_.find(node_id);
  return it == nodes_.end() ? nullptr : &it->second;
}

std::vector<node_record> membership::nodes() const {
  std::vector<node_record> out;
  for (const auto& [id, r] : nodes_)
    out.push_back(r);
  return out;
}

} // namespace troupe::cluster
