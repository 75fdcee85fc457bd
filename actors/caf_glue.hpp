// Glue between troupe's error vocabulary and CAF 0.17: troupe::error <-> caf::error (category
// atom "troupe", the message as context), and the actor_system_config every troupe process uses.
#pragma once

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/error.hpp>
#include <caf/io/middleman_actor.hpp>

#include "cluster/tls.hpp"
#include "runtime/error.hpp"

namespace troupe::actors {

caf::atom_value error_category();
caf::error to_caf(const troupe::error& err);
// Errors from other categories (CAF's own, e.g. a dead peer) become errc::unavailable or
// errc::internal with CAF's rendering as the message.
troupe::error from_caf(const caf::error& err, const caf::actor_system* sys = nullptr);

// The CAF configuration of every troupe daemon: registers the "troupe" error category renderer
// and the io middleman.
class system_config : public caf::actor_system_config {
 public:
  system_config();
  // Also loads CAF's OpenSSL module with this identity: every connection made with connector()
  // or published with caf::openssl::publish is mutual TLS against the cluster CA
  // (docs/security.md). The files must stay in place while the system runs (CAF reads them
  // for every new connection).
  explicit system_config(const cluster::tls::identity_files& tls);
};

// The middleman actor to connect to the head through: the OpenSSL module's when the system
// was configured with TLS, else the plain one (in-process tests).
caf::io::middleman_actor connector(caf::actor_system& sys);

} // namespace troupe::actors
