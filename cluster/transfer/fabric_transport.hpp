// The libfabric transport: one provider (verbs, efa, tcp) and domain, memory registration, a
// listener, and connected FI_EP_MSG endpoints to peers. Opened once per process when a deployment
// loads; connect and accept block up to their deadline. `cluster doctor` and the transfer
// tests/bench use it directly.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

namespace detail {
class fabric_domain;
}

struct fabric_options {
  std::string provider = "auto";  // auto (verbs > efa > tcp), verbs, efa, tcp
  std::string host = "127.0.0.1"; // the local address to listen on / pick the interface
  uint64_t max_write = 0; // largest single write; 0: the provider's max_msg_size (≤ 1 GiB)
};

// One provider as fi_getinfo sees it with the subset troupe needs (FI_EP_MSG, FI_MSG|FI_RMA, verbs'
// registration modes): usable, or why not.
struct provider_probe {
  std::string name;
  bool usable = false;
  std::string detail; // the fabric/domain names and limits, or the reason it is unusable
};
std::vector<provider_probe> probe_providers(const std::string& host);

class fabric_transport final : public kv_transport {
 public:
  // Fails naming why when an explicitly requested provider is absent; "auto" reports its choice in
  // choice(). Never falls back silently.
  static expected<std::unique_ptr<fabric_transport>> open(const fabric_options& options);
  ~fabric_transport() override;

  std::string name() const override;
  const std::string& choice() const { return choice_; } // e.g. "tcp (auto; verbs: ..., efa: ...)"
  uint64_t max_write() const { return max_write_; }
  size_t tx_depth() const;

  expected<region_id> register_memory(void* ptr, size_t length, memory_kind kind) override;
  expected<void> deregister(region_id id) override;
  expected<region_descriptor> describe(region_id id) const override;
  size_t registration_count() const override;

  // Starts listening on host:port (port 0: any); returns the address peers pass to connect().
  expected<std::string> listen(uint16_t port);
  // Blocks until a peer connected, or the deadline (a peer that asked before it gets up to 5 s
  // more to finish the handshake).
  expected<std::unique_ptr<kv_connection>> accept(clock::time_point deadline);
  // Blocks until connected to "host:port", or the deadline.
  expected<std::unique_ptr<kv_connection>> connect(const std::string& address,
                                                   clock::time_point deadline);

 private:
  struct listener;
  fabric_transport() = default;

  std::shared_ptr<detail::fabric_domain> domain_;
  std::unique_ptr<listener> listener_;
  std::string host_;
  std::string choice_;
  uint64_t max_write_ = 0;
};

} // namespace troupe::cluster::transfer
