#include "actors/caf_glue.hpp"

#include <caf/atom.hpp>
#include <caf/io/middleman.hpp>
#include <caf/message.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/sec.hpp>

#include "runtime/log.hpp"

namespace troupe::actors {

namespace detail {
bool openssl_guard_active(); // openssl_guard.cpp
} // namespace detail

namespace {

std::string context_text(const caf::message& context) {
  if (context.size() == 1 && context.match_element<std::string>(0))
    return context.get_as<std::string>(0);
  return context.empty() ? std::string{} : caf::to_string(context);
}

std::string render_error(uint8_t code, caf::atom_value, const caf::message& context) {
  return troupe::error{static_cast<errc>(code), context_text(context)}.to_string();
}

} // namespace

caf::atom_value error_category() {
  return caf::atom("troupe");
}

caf::error to_caf(const troupe::error& err) {
  if (!err)
    return caf::error{};
  return caf::error{static_cast<uint8_t>(err.code()), error_category(),
                    caf::make_message(err.message())};
}

troupe::error from_caf(const caf::error& err, const caf::actor_system* sys) {
  if (!err)
    return {};
  if (err.category() == error_category())
    return {static_cast<errc>(err.code()), context_text(err.context())};
  std::string text = sys != nullptr ? sys->render(err) : caf::to_string(err);
  if (err.category() == caf::atom("system")) {
    auto sec = static_cast<caf::sec>(err.code());
    if (sec == caf::sec::request_timeout)
      return {errc::timeout, text};
    if (sec == caf::sec::request_receiver_down || sec == caf::sec::cannot_connect_to_node ||
        sec == caf::sec::remote_linking_failed)
      return {errc::unavailable, text};
  }
  return {errc::internal, text};
}

system_config::system_config() {
  add_error_category(error_category(), render_error);
  load<caf::io::middleman>();
}

system_config::system_config(const cluster::tls::identity_files& tls) : system_config() {
  if (!detail::openssl_guard_active())
    log::error("TLS: the OpenSSL error-queue guard is not in effect (link the executable with "
               "troupe_actors' openssl_guard.cpp exported); one peer's TLS error may close "
               "other connections");
  load<caf::openssl::manager>();
  openssl_certificate = tls.cert.string();
  openssl_key = tls.key.string();
  openssl_cafile = tls.ca.string();
}

caf::io::middleman_actor connector(caf::actor_system& sys) {
  return sys.has_openssl_manager() ? sys.openssl_manager().actor_handle()
                                   : sys.middleman().actor_handle();
}

} // namespace troupe::actors
