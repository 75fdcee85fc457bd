// Clears OpenSSL's per-thread error queue before every TLS I/O call in this process.
//
// CAF 0.17's OpenSSL module runs all connections on the middleman's one thread and does not
// clear the queue before SSL_read / SSL_write / SSL_accept / SSL_connect, as OpenSSL requires
// (SSL_get_error(3)): an error left by one connection (a peer that closed without close_notify,
// a failed handshake of an unauthenticated client) then makes SSL_get_error report a fatal error
// for the next healthy connection, which CAF closes, so every `cluster status` or rejected
// stranger would disconnect the nodes. These definitions in the executable take the place of
// libssl's for every library in the process (libcaf_openssl calls them through its PLT) and
// call the real ones (RTLD_NEXT) with an empty queue. Linked in by system_config (caf_glue.cpp).
#include <dlfcn.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

namespace {

template <class F>
F next_symbol(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

} // namespace

extern "C" {

int SSL_read(SSL* ssl, void* buf, int num) {
  static const auto real = next_symbol<int (*)(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  return real(ssl, buf, num);
}

int SSL_write(SSL* ssl, const void* buf, int num) {
  static const auto real = next_symbol<int (*)(SSL*, const void*, int)>("SSL_write");
  ERR_clear_error();
  return real(ssl, buf, num);
}

int SSL_accept(SSL* ssl) {
  static const auto real = next_symbol<int (*)(SSL*)>("SSL_accept");
  ERR_clear_error();
  return real(ssl);
}

int SSL_connect(SSL* ssl) {
  static const auto real = next_symbol<int (*)(SSL*)>("SSL_connect");
  ERR_clear_error();
  return real(ssl);
}

} // extern "C"

namespace troupe::actors::detail {

// True when the definitions above are the ones the process resolves (they are in the
// executable and exported to the dynamic symbol table).
bool openssl_guard_active() {
  return dlsym(RTLD_DEFAULT, "SSL_read") == reinterpret_cast<void*>(&SSL_read);
}

} // namespace troupe::actors::detail
