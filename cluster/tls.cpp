#include "cluster/tls.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <list>
#include <mutex>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <fmt/format.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "runtime/log.hpp"

namespace troupe::cluster::tls {

namespace {

// OpenSSL writes to the socket with write(): a peer that has gone away raises SIGPIPE, whose
// default action ends the process (a client closing early would kill the head). Blocked on this
// thread while the guard lives; one raised meanwhile is consumed, the old mask restored.
class sigpipe_guard {
 public:
  sigpipe_guard() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~sigpipe_guard() {
    const timespec now{};
    while (sigtimedwait(&pipe_, nullptr, &now) > 0) {
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

 private:
  sigset_t pipe_{}, old_{};
};

using clock = std::chrono::steady_clock;

// TROUPE_ASSIGN's declaration stays inside its do-block; this one declares in the caller's scope.
#define TLS_CAT2(a, b) a##b
#define TLS_CAT(a, b) TLS_CAT2(a, b)
#define TLS_TRY(decl, expr)                                                                        \
  auto TLS_CAT(tls_try_, __LINE__) = (expr);                                                       \
  if (!TLS_CAT(tls_try_, __LINE__))                                                                \
    return std::move(TLS_CAT(tls_try_, __LINE__)).error();                                         \
  decl = std::move(*TLS_CAT(tls_try_, __LINE__))

template <class T>
expected<T> in(const std::string& where, expected<T> r) {
  if (!r)
    return std::move(r).error().context(where);
  return r;
}
constexpr size_t max_message = 64 * 1024;
constexpr auto server_deadline = std::chrono::seconds(5); // one bootstrap connection, in all

template <class T, void (*Free)(T*)>
struct deleter {
  void operator()(T* p) const { Free(p); }
};
using bio_ptr = std::unique_ptr<BIO, deleter<BIO, BIO_free_all>>;
using pkey_ptr = std::unique_ptr<EVP_PKEY, deleter<EVP_PKEY, EVP_PKEY_free>>;
using x509_ptr = std::unique_ptr<X509, deleter<X509, X509_free>>;
using ctx_ptr = std::unique_ptr<SSL_CTX, deleter<SSL_CTX, SSL_CTX_free>>;
using ssl_ptr = std::unique_ptr<SSL, deleter<SSL, SSL_free>>;
using store_ptr = std::unique_ptr<X509_STORE, deleter<X509_STORE, X509_STORE_free>>;
using store_ctx_ptr = std::unique_ptr<X509_STORE_CTX, deleter<X509_STORE_CTX, X509_STORE_CTX_free>>;
using bn_ptr = std::unique_ptr<BIGNUM, deleter<BIGNUM, BN_free>>;

// OpenSSL's queued errors as one line (and the queue cleared).
std::string ssl_errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += out.empty() ? "" : "; ";
    out += buf;
  }
  return out.empty() ? "no OpenSSL error queued" : out;
}

troupe::error ssl_error(const std::string& what) {
  return make_error(errc::internal, "{}: {}", what, ssl_errors());
}

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  return n > 0 ? std::string(data, static_cast<size_t>(n)) : std::string{};
}

bio_ptr read_bio(const std::string& text) {
  return bio_ptr(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

expected<x509_ptr> parse_cert(const std::string& pem) {
  auto bio = read_bio(pem);
  x509_ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!x)
    return ssl_error("cannot read a PEM certificate");
  return x;
}

expected<pkey_ptr> parse_key(const std::string& pem) {
  auto bio = read_bio(pem);
  pkey_ptr k(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!k)
    return ssl_error("cannot read a PEM private key");
  return k;
}

expected<std::string> cert_pem(X509* x) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_X509(bio.get(), x) != 1)
    return ssl_error("cannot write a certificate");
  return bio_text(bio.get());
}

std::string hex(const unsigned char* p, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i)
    out += fmt::format("{:02x}", p[i]);
  return out;
}

expected<std::string> fingerprint_of(X509* x) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(x, EVP_sha256(), md, &len) != 1)
    return ssl_error("cannot hash a certificate");
  return hex(md, len);
}

expected<void> add_extension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (!ext)
    return ssl_error(fmt::format("cannot make the certificate extension {}", value));
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (ok != 1)
    return ssl_error("cannot add a certificate extension");
  return {};
}

// A certificate skeleton: v3, random serial, validity from an hour ago, subject CN = `name`.
expected<x509_ptr> new_cert(EVP_PKEY* pub, const std::string& name, int days) {
  x509_ptr x(X509_new());
  bn_ptr serial(BN_new());
  if (!x || !serial || X509_set_version(x.get(), 2) != 1 || BN_rand(serial.get(), 127, 0, 0) != 1 ||
      !BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(x.get())) ||
      !X509_gmtime_adj(X509_getm_notBefore(x.get()), -3600) ||
      !X509_gmtime_adj(X509_getm_notAfter(x.get()), 86400L * days) ||
      X509_set_pubkey(x.get(), pub) != 1)
    return ssl_error("cannot make a certificate");
  X509_NAME* subject = X509_get_subject_name(x.get());
  if (X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(name.c_str()), -1, -1,
                                 0) != 1)
    return ssl_error("cannot name a certificate");
  return x;
}

// Writes `text` to `file` with mode 0600 from the start (no window where it is readable).
expected<void> write_private(const fs::path& file, const std::string& text) {
  const fs::path tmp = file.string() + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0)
    return make_error(errc::io_error, "cannot write {}: {}", file.string(), std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n <= 0) {
      ::close(fd);
      return make_error(errc::io_error, "cannot write {}: {}", file.string(), std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), file.c_str()) != 0)
    return make_error(errc::io_error, "cannot write {}: {}", file.string(), std::strerror(errno));
  return {};
}

expected<std::string> read_all(const fs::path& file) {
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return make_error(errc::io_error, "cannot read {}: {}", file.string(), std::strerror(errno));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0 && out.size() < max_message)
    out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

expected<void> private_dir(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!ec)
    fs::permissions(dir, fs::perms::owner_all, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create {}: {}", dir.string(), ec.message());
  return {};
}

// ---- one framed message each way over a non-blocking TLS connection, bounded in time ----

// Runs an SSL call until it completes, waiting on the socket while OpenSSL wants I/O.
template <class F>
expected<int> ssl_call(SSL* ssl, int fd, clock::time_point deadline, const char* what, F&& fn) {
  for (;;) {
    ERR_clear_error();
    const int rc = fn();
    if (rc > 0)
      return rc;
    const int err = SSL_get_error(ssl, rc);
    short events = 0;
    if (err == SSL_ERROR_WANT_READ)
      events = POLLIN;
    else if (err == SSL_ERROR_WANT_WRITE)
      events = POLLOUT;
    else if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0))
      return make_error(errc::unavailable, "{}: the peer closed the connection", what);
    else
      return make_error(errc::unavailable, "{}: {}", what, ssl_errors());
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    pollfd p{fd, events, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0)
      return make_error(errc::timeout, "{}: timed out", what);
  }
}

expected<void> send_message(SSL* ssl, int fd, clock::time_point deadline, const std::string& body) {
  std::string frame(4, '\0');
  const auto n = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i)
    frame[static_cast<size_t>(i)] = static_cast<char>((n >> (24 - 8 * i)) & 0xff);
  frame += body;
  size_t done = 0;
  while (done < frame.size()) {
    TLS_TRY(auto wrote, ssl_call(ssl, fd, deadline, "TLS write", [&] {
              return SSL_write(ssl, frame.data() + done, static_cast<int>(frame.size() - done));
            }));
    done += static_cast<size_t>(wrote);
  }
  return {};
}

expected<std::string> receive_message(SSL* ssl, int fd, clock::time_point deadline) {
  auto read_exact = [&](char* out, size_t len) -> expected<void> {
    size_t done = 0;
    while (done < len) {
      TLS_TRY(auto got, ssl_call(ssl, fd, deadline, "TLS read", [&] {
                return SSL_read(ssl, out + done, static_cast<int>(len - done));
              }));
      done += static_cast<size_t>(got);
    }
    return {};
  };
  unsigned char head[4];
  TROUPE_TRY_VOID(read_exact(reinterpret_cast<char*>(head), 4));
  const uint32_t n = (uint32_t{head[0]} << 24) | (uint32_t{head[1]} << 16) |
                     (uint32_t{head[2]} << 8) | uint32_t{head[3]};
  if (n > max_message)
    return make_error(errc::invalid_argument, "bootstrap message of {} bytes (at most {})", n,
                      max_message);
  std::string body(n, '\0');
  TROUPE_TRY_VOID(read_exact(body.data(), n));
  return body;
}

// "key value" lines, a blank line, then free text.
struct parsed_message {
  std::string first;
  std::vector<std::pair<std::string, std::string>> fields;
  std::string rest;
  std::string field(const std::string& key) const {
    for (const auto& [k, v] : fields)
      if (k == key)
        return v;
    return {};
  }
};

parsed_message parse_message(const std::string& body) {
  parsed_message m;
  size_t pos = 0;
  bool first = true;
  while (pos < body.size()) {
    size_t end = body.find('\n', pos);
    if (end == std::string::npos)
      end = body.size();
    std::string line = body.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty())
      break;
    if (first) {
      m.first = line;
      first = false;
      continue;
    }
    const size_t sp = line.find(' ');
    m.fields.emplace_back(line.substr(0, sp), sp == std::string::npos ? "" : line.substr(sp + 1));
  }
  m.rest = pos < body.size() ? body.substr(pos) : std::string{};
  return m;
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 64)
    return false;
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.')
      return false;
  return true;
}

expected<ctx_ptr> server_context(const identity& id) {
  ctx_ptr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx || SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1)
    return ssl_error("cannot make a TLS context");
  TLS_TRY(auto cert, parse_cert(id.cert_pem));
  TLS_TRY(auto key, parse_key(id.key_pem));
  TLS_TRY(auto ca, parse_cert(id.ca_pem));
  if (SSL_CTX_use_certificate(ctx.get(), cert.get()) != 1 ||
      SSL_CTX_use_PrivateKey(ctx.get(), key.get()) != 1 ||
      SSL_CTX_check_private_key(ctx.get()) != 1)
    return ssl_error("cannot use the head's certificate for the join bootstrap");
  if (SSL_CTX_add_extra_chain_cert(ctx.get(), ca.get()) != 1) // takes ownership
    return ssl_error("cannot add the CA certificate to the bootstrap chain");
  ca.release();
  return ctx;
}

class server_impl final : public bootstrap_server {
 public:
  server_impl(int fd, uint16_t port, certificate_authority ca, ctx_ptr ctx, std::string token)
    : fd_(fd), port_(port), ca_(std::move(ca)), ctx_(std::move(ctx)), token_(std::move(token)) {
    if (::pipe2(wake_, O_CLOEXEC) != 0)
      wake_[0] = wake_[1] = -1;
    thread_ = std::thread([this] { loop(); });
  }
  ~server_impl() override {
    stop_ = true;
    if (wake_[1] >= 0) {
      [[maybe_unused]] auto n = ::write(wake_[1], "x", 1);
    }
    thread_.join(); // which joins the connections' threads
    ::close(fd_);
    for (int w : wake_)
      if (w >= 0)
        ::close(w);
  }
  uint16_t port() const override { return port_; }
  uint64_t issued() const override { return issued_; }
  uint64_t refused() const override { return refused_; }

 private:
  void loop() {
    while (!stop_) {
      pollfd p[2] = {{fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
      if (::poll(p, wake_[0] >= 0 ? 2 : 1, 1000) <= 0 || stop_)
        continue;
      if (!(p[0].revents & POLLIN))
        continue;
      sockaddr_storage peer{};
      socklen_t len = sizeof peer;
      int conn =
          ::accept4(fd_, reinterpret_cast<sockaddr*>(&peer), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (conn < 0)
        continue;
      char host[NI_MAXHOST] = "?";
      ::getnameinfo(reinterpret_cast<sockaddr*>(&peer), len, host, sizeof host, nullptr, 0,
                    NI_NUMERICHOST);
      start(conn, host);
    }
    for (auto& c : conns_)
      c.thread.join();
  }

  // Each connection on its own thread, so that a client that stalls (for up to server_deadline)
  // delays no one else; at most max_per_peer at once from one address, max_conns in all.
  static constexpr size_t max_conns = 64, max_per_peer = 8;
  struct conn_thread {
    std::string peer;
    std::atomic<bool> done{false};
    std::thread thread;
  };
  void start(int conn, const std::string& peer) {
    conns_.remove_if([](conn_thread& c) {
      if (!c.done)
        return false;
      c.thread.join();
      return true;
    });
    const auto from_peer = std::count_if(conns_.begin(), conns_.end(),
                                         [&](const conn_thread& c) { return c.peer == peer; });
    if (conns_.size() >= max_conns || static_cast<size_t>(from_peer) >= max_per_peer) {
      note_refusal("? from " + peer, fmt::format("too many joins at once ({} from this address, "
                                                 "{} in all)",
                                                 from_peer, conns_.size()));
      ::close(conn);
      return;
    }
    auto& c = conns_.emplace_back();
    c.peer = peer;
    c.thread = std::thread([this, conn, &c] {
      serve(conn, c.peer);
      ::close(conn);
      c.done = true;
    });
  }

  // One connection, within server_deadline: handshake, request, reply.
  void serve(int conn, const std::string& peer) {
    const sigpipe_guard no_sigpipe;
    const auto deadline = clock::now() + server_deadline;
    ssl_ptr ssl(SSL_new(ctx_.get()));
    if (!ssl || SSL_set_fd(ssl.get(), conn) != 1)
      return;
    auto hs =
        ssl_call(ssl.get(), conn, deadline, "TLS handshake", [&] { return SSL_accept(ssl.get()); });
    if (!hs) {
      note_refusal("? from " + peer, hs.error().message());
      return;
    }
    auto body = receive_message(ssl.get(), conn, deadline);
    if (!body) {
      note_refusal("? from " + peer, body.error().message());
      return;
    }
    auto reply = answer(*body, peer);
    (void)send_message(ssl.get(), conn, deadline, reply);
    ERR_clear_error();
    SSL_shutdown(ssl.get());
  }

  std::string answer(const std::string& body, const std::string& peer) {
    const auto req = parse_message(body);
    const std::string name = req.field("name");
    const std::string who = valid_name(name) ? name : "?";
    auto refuse = [&](const std::string& why) {
      note_refusal(who + " from " + peer, why);
      return "refused\n\n" + why;
    };
    if (req.first != "troupe-bootstrap 1")
      return refuse("not a troupe bootstrap request (other troupe version?)");
    if (!same_secret(req.field("token"), token_))
      return refuse("wrong cluster token");
    if (!valid_name(name))
      return refuse("the name must be 1 to 64 letters, digits, '.', '-' or '_'");
    // A CLI call's certificate serves one command: valid for a day, not ten years.
    const bool client = req.field("role") == "client";
    auto cert = issue_certificate(ca_, req.rest, name, client ? 1 : 3650);
    if (!cert)
      return refuse(cert.error().message());
    ++issued_;
    if (client) // `cluster status` and the like: one per command
      log::debug("head: issued a control-plane certificate to client {} ({})", name, peer);
    else
      log::info("head: issued a control-plane certificate to node {} ({})", name, peer);
    return "ok\n\n" + *cert;
  }

  // Logged once per 10 s at most, with the count since the last line.
  void note_refusal(const std::string& who, const std::string& why) {
    ++refused_;
    std::lock_guard lk(log_mu_);
    ++unlogged_;
    const auto now = clock::now();
    if (now - last_log_ < std::chrono::seconds(10) && logged_once_)
      return;
    log::warn("head: refused join of {} at the bootstrap: {} ({} refusal(s) since the last such "
              "line)",
              who, why, unlogged_);
    unlogged_ = 0;
    last_log_ = now;
    logged_once_ = true;
  }

  int fd_;
  uint16_t port_;
  certificate_authority ca_;
  ctx_ptr ctx_;
  std::string token_;
  int wake_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> issued_{0}, refused_{0};
  std::list<conn_thread> conns_; // the accepting thread's
  std::mutex log_mu_;            // note_refusal's counters
  uint64_t unlogged_ = 0;
  clock::time_point last_log_{};
  bool logged_once_ = false;
  std::thread thread_;
};

expected<int> listen_on(const std::string& host, uint16_t port, uint16_t& bound) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
      rc != 0)
    return make_error(errc::invalid_argument, "cannot resolve {}: {}", host, gai_strerror(rc));
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  bool ok = fd >= 0 && ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0 &&
            ::bind(fd, res->ai_addr, res->ai_addrlen) == 0 && ::listen(fd, 64) == 0;
  const int saved = errno;
  ::freeaddrinfo(res);
  if (!ok) {
    if (fd >= 0)
      ::close(fd);
    return make_error(errc::unavailable, "cannot listen on {}:{}: {}", host.empty() ? "*" : host,
                      port, std::strerror(saved));
  }
  sockaddr_in addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  bound = ntohs(addr.sin_port);
  return fd;
}

expected<int> connect_to(const std::string& host, uint16_t port, clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0)
    return make_error(errc::unavailable, "cannot resolve {}: {}", host, gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    int fd = ::socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
      continue;
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
      pollfd p{fd, POLLOUT, 0};
      int err = ETIMEDOUT;
      socklen_t len = sizeof err;
      if (left.count() > 0 && ::poll(&p, 1, static_cast<int>(left.count())) > 0)
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    why = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return make_error(errc::unavailable, "cannot reach the head's join bootstrap at {}:{}: {}", host,
                    port, why);
}

// The CA certificate in the server's chain whose fingerprint is `pin`, verified to have signed
// the server's certificate.
expected<std::string> pinned_ca(SSL* ssl, const std::string& pin) {
  STACK_OF(X509)* chain = SSL_get_peer_cert_chain(ssl);
  x509_ptr leaf(SSL_get1_peer_certificate(ssl));
  if (!chain || !leaf)
    return make_error(errc::invalid_argument, "the head sent no certificate");
  X509* ca = nullptr;
  std::string seen;
  for (int i = 0; i < sk_X509_num(chain); ++i) {
    X509* x = sk_X509_value(chain, i);
    TLS_TRY(auto fp, fingerprint_of(x));
    seen += seen.empty() ? fp : ", " + fp;
    if (same_secret(fp, pin))
      ca = x;
  }
  if (!ca)
    return make_error(errc::invalid_argument,
                      "the head's CA certificate does not have the fingerprint --ca-sha256 {} "
                      "(it offered {}): a different head, or someone in between",
                      pin, seen);
  store_ptr store(X509_STORE_new());
  store_ctx_ptr vctx(X509_STORE_CTX_new());
  if (!store || !vctx || X509_STORE_add_cert(store.get(), ca) != 1 ||
      X509_STORE_CTX_init(vctx.get(), store.get(), leaf.get(), nullptr) != 1)
    return ssl_error("cannot verify the head's certificate");
  if (X509_verify_cert(vctx.get()) != 1)
    return make_error(errc::invalid_argument, "the head's certificate is not signed by its CA: {}",
                      X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx.get())));
  return cert_pem(ca);
}

} // namespace

bool same_secret(std::string_view a, std::string_view b) {
  // Compare equal-length buffers only; the length itself is not secret.
  if (a.size() != b.size())
    return false;
  return a.empty() || CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

expected<std::string> new_private_key() {
  pkey_ptr key(EVP_EC_gen("P-256"));
  if (!key)
    return ssl_error("cannot generate an EC key");
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return ssl_error("cannot write a private key");
  return bio_text(bio.get());
}

expected<std::string> public_key_of(const std::string& key_pem) {
  TLS_TRY(auto key, parse_key(key_pem));
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PUBKEY(bio.get(), key.get()) != 1)
    return ssl_error("cannot write a public key");
  return bio_text(bio.get());
}

expected<std::string> fingerprint(const std::string& pem) {
  TLS_TRY(auto x, parse_cert(pem));
  return fingerprint_of(x.get());
}

expected<certificate_authority> open_ca(const fs::path& dir) {
  const fs::path cert_file = dir / "ca.pem", key_file = dir / "ca.key";
  std::error_code ec;
  if (fs::exists(cert_file, ec) && fs::exists(key_file, ec)) {
    TLS_TRY(auto cert, read_all(cert_file));
    TLS_TRY(auto key, read_all(key_file));
    TLS_TRY(auto x, parse_cert(cert));
    TLS_TRY(auto k, parse_key(key));
    if (X509_check_private_key(x.get(), k.get()) != 1)
      return make_error(errc::invalid_argument, "{} does not belong to {}", key_file.string(),
                        cert_file.string());
    return certificate_authority{cert, key};
  }
  TROUPE_TRY_VOID(private_dir(dir));
  TLS_TRY(auto key_pem, new_private_key());
  TLS_TRY(auto key, parse_key(key_pem));
  unsigned char id[6];
  RAND_bytes(id, sizeof id);
  TLS_TRY(auto x, new_cert(key.get(), "troupe cluster CA " + hex(id, sizeof id), 3650));
  X509_set_issuer_name(x.get(), X509_get_subject_name(x.get()));
  TROUPE_TRY_VOID(add_extension(x.get(), x.get(), NID_basic_constraints, "critical,CA:TRUE"));
  TROUPE_TRY_VOID(add_extension(x.get(), x.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  TROUPE_TRY_VOID(add_extension(x.get(), x.get(), NID_subject_key_identifier, "hash"));
  if (X509_sign(x.get(), key.get(), EVP_sha256()) <= 0)
    return ssl_error("cannot sign the CA certificate");
  TLS_TRY(auto pem, cert_pem(x.get()));
  TROUPE_TRY_VOID(write_private(key_file, key_pem));
  TROUPE_TRY_VOID(write_private(cert_file, pem));
  return certificate_authority{pem, key_pem};
}

expected<std::string> issue_certificate(const certificate_authority& ca,
                                        const std::string& public_key_pem, const std::string& name,
                                        int days) {
  TLS_TRY(auto ca_cert, parse_cert(ca.cert_pem));
  TLS_TRY(auto ca_key, parse_key(ca.key_pem));
  auto bio = read_bio(public_key_pem);
  pkey_ptr pub(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  if (!pub)
    return make_error(errc::invalid_argument, "not a PEM public key: {}", ssl_errors());
  if (EVP_PKEY_get_bits(pub.get()) < 256)
    return make_error(errc::invalid_argument, "the public key is too weak ({} bits)",
                      EVP_PKEY_get_bits(pub.get()));
  TLS_TRY(auto x, new_cert(pub.get(), name, days));
  X509_set_issuer_name(x.get(), X509_get_subject_name(ca_cert.get()));
  TROUPE_TRY_VOID(
      add_extension(x.get(), ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE"));
  TROUPE_TRY_VOID(
      add_extension(x.get(), ca_cert.get(), NID_key_usage, "critical,digitalSignature"));
  TROUPE_TRY_VOID(
      add_extension(x.get(), ca_cert.get(), NID_ext_key_usage, "serverAuth,clientAuth"));
  if (X509_sign(x.get(), ca_key.get(), EVP_sha256()) <= 0)
    return ssl_error("cannot sign a certificate");
  return cert_pem(x.get());
}

expected<identity> issue_identity(const certificate_authority& ca, const std::string& name) {
  identity id{ca.cert_pem, {}, {}};
  TLS_TRY(id.key_pem, new_private_key());
  TLS_TRY(auto pub, public_key_of(id.key_pem));
  TLS_TRY(id.cert_pem, issue_certificate(ca, pub, name));
  return id;
}

expected<identity_files> write_identity(const fs::path& dir, const std::string& role,
                                        const identity& id) {
  TROUPE_TRY_VOID(private_dir(dir));
  identity_files f{dir / "ca.pem", dir / (role + ".pem"), dir / (role + ".key")};
  TROUPE_TRY_VOID(write_private(f.key, id.key_pem));
  TROUPE_TRY_VOID(write_private(f.cert, id.cert_pem));
  TROUPE_TRY_VOID(write_private(f.ca, id.ca_pem));
  return f;
}

expected<identity_files> find_identity(const fs::path& dir, const std::string& role) {
  identity_files f{dir / "ca.pem", dir / (role + ".pem"), dir / (role + ".key")};
  std::error_code ec;
  for (const auto& p : {f.ca, f.cert, f.key})
    if (!fs::exists(p, ec))
      return make_error(errc::not_found, "no {}", p.string());
  return f;
}

void remove_identity(const fs::path& dir, const std::string& role) {
  std::error_code ec;
  fs::remove(dir / (role + ".pem"), ec);
  fs::remove(dir / (role + ".key"), ec);
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.path().extension() == ".key")
      return; // another role of this session still uses ca.pem
  fs::remove(dir / "ca.pem", ec);
  fs::remove(dir, ec);
}

expected<std::unique_ptr<bootstrap_server>>
bootstrap_server::start(const std::string& host, uint16_t port, certificate_authority ca,
                        identity server, std::string token) {
  TLS_TRY(auto ctx, server_context(server));
  uint16_t bound = 0;
  TLS_TRY(int fd, listen_on(host, port, bound));
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  return std::unique_ptr<bootstrap_server>(
      new server_impl(fd, bound, std::move(ca), std::move(ctx), std::move(token)));
}

expected<identity> bootstrap(const std::string& host, uint16_t port, const std::string& token,
                             const std::string& ca_sha256, const std::string& name,
                             const std::string& key_pem, std::chrono::milliseconds timeout) {
  const sigpipe_guard no_sigpipe;
  std::string pin;
  for (char c : ca_sha256)
    if (c != ':')
      pin += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (pin.rfind("sha256", 0) == 0)
    pin = pin.substr(6);
  if (pin.size() != 64 || pin.find_first_not_of("0123456789abcdef") != std::string::npos)
    return make_error(errc::invalid_argument,
                      "--ca-sha256 '{}' is not a SHA-256 fingerprint (64 hex characters, as "
                      "printed by `cluster start --head`)",
                      ca_sha256);
  const auto deadline = clock::now() + timeout;
  TLS_TRY(int fd, connect_to(host, port, deadline));
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } close_fd{fd};
  ctx_ptr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx || SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1)
    return ssl_error("cannot make a TLS context");
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr); // checked against the pin below
  ssl_ptr ssl(SSL_new(ctx.get()));
  if (!ssl || SSL_set_fd(ssl.get(), fd) != 1)
    return ssl_error("cannot make a TLS connection");
  const std::string where = fmt::format("join bootstrap at {}:{}", host, port);
  TROUPE_TRY_VOID(in(where, ssl_call(ssl.get(), fd, deadline, "TLS handshake",
                                     [&] { return SSL_connect(ssl.get()); })));
  TLS_TRY(auto ca_pem, pinned_ca(ssl.get(), pin));
  TLS_TRY(auto pub, public_key_of(key_pem));
  const char* role = name.rfind("cli-", 0) == 0 ? "client" : "node";
  TROUPE_TRY_VOID(
      in(where, send_message(ssl.get(), fd, deadline,
                             fmt::format("troupe-bootstrap 1\ntoken {}\nname {}\nrole {}\n\n{}",
                                         token, name, role, pub))));
  TLS_TRY(auto body, in(where, receive_message(ssl.get(), fd, deadline)));
  const auto reply = parse_message(body);
  if (reply.first == "refused")
    return make_error(errc::invalid_argument, "the head refused {}: {}",
                      role[0] == 'c' ? "the certificate request" : "to admit this node",
                      reply.rest);
  if (reply.first != "ok")
    return make_error(errc::invalid_argument, "{}: unexpected reply", where);
  TLS_TRY(auto cert, parse_cert(reply.rest));
  TLS_TRY(auto key, parse_key(key_pem));
  if (X509_check_private_key(cert.get(), key.get()) != 1)
    return make_error(errc::invalid_argument, "{}: the certificate is not for this node's key",
                      where);
  ERR_clear_error();
  SSL_shutdown(ssl.get());
  return identity{ca_pem, reply.rest, key_pem};
}

} // namespace troupe::cluster::tls
