// The control plane's TLS material (docs/security.md): the per-cluster CA that `cluster start
// --head` creates, the certificates it issues, the CA fingerprint a joining node pins, and the
// join bootstrap: a small TLS listener on the head (port + 1) where a node proves the cluster
// token once and receives a certificate for its own key. CAF's OpenSSL module then runs every
// control-plane connection over mutual TLS with these files. Plain C++ over OpenSSL's C API;
// blocking calls (file I/O, sockets), any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "runtime/error.hpp"

namespace troupe::cluster::tls {

namespace fs = std::filesystem;

// PEM texts of one party: the cluster CA's certificate, its own certificate and private key.
struct identity {
  std::string ca_pem, cert_pem, key_pem;
};

// Where an identity lies on disk (what CAF's openssl.cafile / certificate / key options name).
struct identity_files {
  fs::path ca, cert, key;
};

// Compares two secrets in time that depends only on their lengths.
bool same_secret(std::string_view a, std::string_view b);

// The CA of one cluster: `dir`/ca.pem and `dir`/ca.key (0600, folder 0700). Loads them when
// present (a restarted head keeps its cluster's CA), else creates a new EC P-256 CA.
struct certificate_authority {
  std::string cert_pem, key_pem;
};
expected<certificate_authority> open_ca(const fs::path& dir);

// Lower-case hex SHA-256 of a PEM certificate's DER encoding (64 characters), as printed in the
// join command (`--ca-sha256`).
expected<std::string> fingerprint(const std::string& cert_pem);

// A new EC P-256 private key (PEM) and its public key (PEM).
expected<std::string> new_private_key();
expected<std::string> public_key_of(const std::string& key_pem);

// A certificate for `public_key_pem` with common name `name`, signed by `ca`, valid for `days`.
expected<std::string> issue_certificate(const certificate_authority& ca,
                                        const std::string& public_key_pem, const std::string& name,
                                        int days = 3650);

// A new key and a certificate for it, issued by `ca` in this process (the head's own identity).
expected<identity> issue_identity(const certificate_authority& ca, const std::string& name);

// Writes `id` as `dir`/ca.pem, `dir`/<role>.pem and `dir`/<role>.key (all 0600, folder 0700).
expected<identity_files> write_identity(const fs::path& dir, const std::string& role,
                                        const identity& id);
// The files write_identity wrote for `role`, when all three exist.
expected<identity_files> find_identity(const fs::path& dir, const std::string& role);
// Removes what write_identity wrote for `role` (ca.pem too when no other role's key is left).
void remove_identity(const fs::path& dir, const std::string& role);

// The head's join bootstrap listener. Each connection: TLS (server certificate issued by the
// CA, the CA certificate in the chain so the node can check its fingerprint), then one request
// (cluster token, node name, public key) and one reply (a certificate, or the reason it was
// refused). Requests are bounded in size and time; a wrong token is logged (rate-limited) and
// refused. Runs its own thread; the destructor stops it.
class bootstrap_server {
 public:
  static expected<std::unique_ptr<bootstrap_server>> start(const std::string& host, uint16_t port,
                                                           certificate_authority ca,
                                                           identity server, std::string token);
  virtual ~bootstrap_server() = default;
  virtual uint16_t port() const = 0;
  // Requests served and refused so far (tests, logs).
  virtual uint64_t issued() const = 0;
  virtual uint64_t refused() const = 0;
};

// The node's side: connects to host:port, checks that the server's chain holds a CA certificate
// whose fingerprint is `ca_sha256` and that the server's certificate is signed by it (before
// sending the token), proves `token` and returns the CA certificate and a certificate for
// `key_pem`. A refusal is errc::invalid_argument with the head's reason; an unreachable head
// errc::unavailable; a fingerprint mismatch errc::invalid_argument naming both fingerprints.
expected<identity> bootstrap(const std::string& host, uint16_t port, const std::string& token,
                             const std::string& ca_sha256, const std::string& name,
                             const std::string& key_pem,
                             std::chrono::milliseconds timeout = std::chrono::seconds(10));

// The bootstrap listener's port for a head whose control-plane port is `port`.
constexpr uint16_t bootstrap_port(uint16_t port) {
  return static_cast<uint16_t>(port + 1);
}

} // namespace troupe::cluster::tls
