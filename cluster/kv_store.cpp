#include "cluster/kv_store.hpp"

#include <algorithm>

namespace troupe::cluster {

std::vector<kv_store::waiter_id> kv_store::set(const std::string& ns, const std::string& key,
                                               std::string value) {
  values_[ns][key] = std::move(value);
  std::vector<waiter_id> done;
  std::erase_if(waiters_, [&](const waiter& w) {
    if (w.ns != ns || w.key != key)
      return false;
    done.push_back(w.id);
    return true;
  });
  return done;
}

std::optional<std::string> kv_store::get(const std::string& ns, const std::string& key) const {
  auto n = values_.find(ns);
  if (n == values_.end())
    return std::nullopt;
  auto v = n->second.find(key);
  if (v == n->second.end())
    return std::nullopt;
  return v->second;
}

std::variant<std::string, kv_store::waiter_id>
kv_store::wait(const std::string& ns, const std::string& key, clock::time_point deadline) {
  if (auto v = get(ns, key))
    return *std::move(v);
  waiters_.push_back({next_id_, ns, key, deadline});
  return next_id_++;
}

std::vector<kv_store::waiter_id> kv_store::expire(clock::time_point now) {
  std::vector<waiter_id> done;
  std::erase_if(waiters_, [&](const waiter& w) {
    if (w.deadline > now)
      return false;
    done.push_back(w.id);
    return true;
  });
  return done;
}

bool kv_store::erase(const std::string& ns, const std::string& key) {
  auto n = values_.find(ns);
  if (n == values_.end() || n->second.erase(key) == 0)
    return false;
  if (n->second.empty())
    values_.erase(n);
  return true;
}

std::vector<kv_store::waiter_id> kv_store::drop_namespace(const std::string& ns) {
  values_.erase(ns);
  std::vector<waiter_id> done;
  std::erase_if(waiters_, [&](const waiter& w) {
    if (w.ns != ns)
      return false;
    done.push_back(w.id);
    return true;
  });
  return done;
}

std::vector<std::string> kv_store::namespaces() const {
  std::vector<std::string> out;
  for (const auto& [ns, values] : values_)
    out.push_back(ns);
  return out;
}

size_t kv_store::size(const std::string& ns) const {
  auto n = values_.find(ns);
  return n == values_.end() ? 0 : n->second.size();
}

} // namespace troupe::cluster
