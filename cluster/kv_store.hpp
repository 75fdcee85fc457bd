// The head's key-value store for rendezvous (NCCL unique ids, Gloo stores, transfer endpoints):
// set/get, and wait with a deadline, namespaced per deployment. Plain C++ owned by head_actor,
// which maps waiter ids to CAF response promises. Not thread-safe; never blocks.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace troupe::cluster {

class kv_store {
 public:
  using clock = std::chrono::steady_clock;
  using waiter_id = uint64_t;

  // Stores the value; returns the waiters on this key, now satisfied (they get `value`).
  std::vector<waiter_id> set(const std::string& ns, const std::string& key, std::string value);
  std::optional<std::string> get(const std::string& ns, const std::string& key) const;
  // The value if present, else a new waiter id that set() or expire() will report.
  std::variant<std::string, waiter_id> wait(const std::string& ns, const std::string& key,
                                            clock::time_point deadline);
  // Waiters whose deadline passed (removed).
  std::vector<waiter_id> expire(clock::time_point now);
  bool erase(const std::string& ns, const std::string& key);
  // Removes a deployment's namespace (values and waiters, returned so they can be failed).
  std::vector<waiter_id> drop_namespace(const std::string& ns);
  std::vector<std::string> namespaces() const;
  size_t size(const std::string& ns) const;

 private:
  struct waiter {
    waiter_id id;
    std::string ns, key;
    clock::time_point deadline;
  };
  std::map<std::string, std::map<std::string, std::string>> values_;
  std::vector<waiter> waiters_;
  waiter_id next_id_ = 1;
};

} // namespace troupe::cluster
