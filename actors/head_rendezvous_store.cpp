#include "actors/head_rendezvous_store.hpp"

#include <caf/scoped_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"

namespace troupe::actors {

using namespace std::chrono_literals;

expected<void> head_rendezvous_store::set(const std::string& key, const std::vector<char>& value) {
  caf::scoped_actor self{sys_};
  expected<void> out = make_error(errc::internal, "kv_set {}: no reply", key);
  self->request(head_, 10s, msg::kv_set_atom::value, token_, ns_, key,
                std::string(value.begin(), value.end()))
      .receive([&](bool) { out = {}; },
               [&](caf::error& e) { out = from_caf(e, &sys_).context("kv_set " + key); });
  return out;
}

expected<std::vector<char>> head_rendezvous_store::get(const std::string& key,
                                                       std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys_};
  expected<std::vector<char>> out = make_error(errc::internal, "kv_wait {}: no reply", key);
  // The head answers at its own deadline; ours only guards against a head that is gone.
  self->request(head_, timeout + 5s, msg::kv_wait_atom::value, token_, ns_, key,
                static_cast<int64_t>(timeout.count()))
      .receive([&](std::string& v) { out = std::vector<char>(v.begin(), v.end()); },
               [&](caf::error& e) { out = from_caf(e, &sys_).context("kv_wait " + key); });
  return out;
}

expected<void> head_rendezvous_store::wait(const std::vector<std::string>& keys,
                                           std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (const auto& key : keys) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    auto v = get(key, std::max(left, 1ms));
    if (!v)
      return std::move(v).error();
  }
  return {};
}

} // namespace troupe::actors
