// Glue between troupe's error vocabulary and CAF 0.17: troupe::error <-> caf::error (category
// atom "troupe", the message as context), and the actor_system_config every troupe process uses.
#pragma once

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/error.hpp>

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
};

} // namespace troupe::actors
