#include "cluster/transfer/doctor_peer.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>

#include "cluster/transfer/diagnostics.hpp"
#include "cluster/transfer/socket_transport.hpp"
#ifdef TROUPE_WITH_FABRIC
#include "cluster/transfer/fabric_transport.hpp"
#endif

namespace troupe::cluster::transfer {
namespace {
using namespace std::chrono_literals;

using accept_fn = std::function<expected<std::unique_ptr<kv_connection>>(clock::time_point)>;

// One transport the serving side offers, with the memory peers write into.
struct offered {
  endpoint_address endpoint;
  std::shared_ptr<kv_transport> transport;
  accept_fn accept;
  std::vector<uint8_t> buffer;
  region_descriptor descriptor;
};

std::string hex(const std::vector<uint8_t>& bytes) {
  std::string out;
  for (uint8_t b : bytes)
    out += fmt::format("{:02x}", b);
  return out;
}

std::vector<uint8_t> unhex(const std::string& text) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < text.size(); i += 2)
    out.push_back(static_cast<uint8_t>(std::stoi(text.substr(i, 2), nullptr, 16)));
  return out;
}

template <class T>
expected<offered> offer(std::shared_ptr<T> t, const std::string& name, uint64_t bytes) {
  offered o{{name, ""},
            t,
            [t](clock::time_point d) { return t->accept(d); },
            std::vector<uint8_t>(bytes),
            {}};
  TROUPE_ASSIGN(o.endpoint.address, t->listen(0));
  region_id id = 0;
  TROUPE_ASSIGN(id, t->register_memory(o.buffer.data(), bytes, memory_kind::host));
  TROUPE_ASSIGN(o.descriptor, t->describe(id));
  return o;
}

// Answers every notice with an empty batch of the same lease until the peer goes away.
void echo_forever(offered& o) {
  for (;;) {
    auto c = o.accept(clock::now() + 24h);
    if (!c)
      continue;
    for (;;) {
      auto n = (*c)->wait_notice(clock::now() + 1h);
      if (!n)
        break;
      auto id = (*c)->post(write_batch{.lease_id = n->lease_id, .deadline = clock::now() + 10s});
      if (!id || !(*c)->wait(*id))
        break;
    }
  }
}

expected<int> tcp_socket(const std::string& host, const std::string& port, bool listening) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    return make_error(errc::not_found, "{}:{}: {}", host, port, gai_strerror(rc));
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int rc = listening ? (bind(fd, res->ai_addr, res->ai_addrlen) || listen(fd, 8))
                     : connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc != 0) {
    close(fd);
    return make_error(errc::unavailable, "{} {}:{}: {}", listening ? "listen on" : "connect to",
                      host, port, std::strerror(errno));
  }
  return fd;
}

} // namespace

expected<void> serve_measurements(const std::string& host, uint16_t port, uint64_t bytes,
                                  const std::function<void(const std::string&)>& ready) {
  std::vector<std::unique_ptr<offered>> offers;
  auto sock = offer(socket_transport::create(host), "socket", bytes);
  if (!sock)
    return std::move(sock).error();
  offers.push_back(std::make_unique<offered>(std::move(*sock)));
#ifdef TROUPE_WITH_FABRIC
  for (const provider_probe& p : probe_providers(host)) {
    if (!p.usable)
      continue;
    auto t = fabric_transport::open({.provider = p.name, .host = host});
    if (!t)
      return std::move(t).error();
    auto o = offer(std::shared_ptr<fabric_transport>(std::move(*t)), p.name, bytes);
    if (!o)
      return std::move(o).error();
    offers.push_back(std::make_unique<offered>(std::move(*o)));
  }
#endif
  for (auto& o : offers)
    std::thread([&o = *o] { echo_forever(o); }).detach(); // serves until the process ends
  int fd = -1;
  TROUPE_ASSIGN(fd, tcp_socket(host, std::to_string(port), true));
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  ready(fmt::format("{}:{}", host, ntohs(bound.sin_port)));
  std::string listing;
  for (const auto& o : offers)
    listing += fmt::format("{} {}\n", o->endpoint.serialize(), hex(o->descriptor.serialize()));
  for (;;) {
    int c = accept(fd, nullptr, nullptr);
    if (c < 0)
      continue;
    (void)!write(c, listing.data(), listing.size());
    close(c);
  }
}

namespace {

// A connection to one offered endpoint, opened from local address `host`.
expected<std::pair<std::shared_ptr<kv_transport>, std::unique_ptr<kv_connection>>>
connect_endpoint(const endpoint_address& e, const std::string& host) {
  auto deadline = clock::now() + 10s;
  if (e.transport == "socket") {
    auto t = socket_transport::create(host);
    auto c = t->connect(e.address, deadline);
    if (!c)
      return std::move(c).error();
    return std::make_pair(std::shared_ptr<kv_transport>(t), std::move(*c));
  }
#ifdef TROUPE_WITH_FABRIC
  auto t = fabric_transport::open({.provider = e.transport, .host = host});
  if (!t)
    return std::move(t).error();
  auto c = (*t)->connect(e.address, deadline);
  if (!c)
    return std::move(c).error();
  return std::make_pair(std::shared_ptr<kv_transport>(std::move(*t)), std::move(*c));
#else
  return make_error(errc::unsupported, "{}: built without libfabric", e.transport);
#endif
}

// One batch of `bytes` and the peer's echo; returns seconds.
expected<double> echoed_batch(kv_connection& c, region_id local, const region_descriptor& remote,
                              uint64_t bytes) {
  auto t0 = clock::now();
  write_batch b{.lease_id = 7, .locals = {local}, .remotes = {remote}, .deadline = t0 + 30s};
  b.ranges = {{0, 0, 0, 0, bytes}};
  auto id = c.post(std::move(b));
  if (!id)
    return std::move(id).error();
  TROUPE_TRY_VOID(c.wait(*id));
  TROUPE_TRY_VOID(c.wait_notice(clock::now() + 30s));
  return std::chrono::duration<double>(clock::now() - t0).count();
}

expected<peer_report> measure_one(const endpoint_address& e, const region_descriptor& remote,
                                  const std::string& host, uint64_t bytes, int rounds) {
  auto conn = connect_endpoint(e, host);
  if (!conn)
    return std::move(conn).error();
  auto& [transport, c] = *conn;
  bytes = std::min(bytes, remote.length);
  std::vector<uint8_t> src(bytes, 5);
  region_id local = 0;
  TROUPE_ASSIGN(local, transport->register_memory(src.data(), bytes, memory_kind::host));
  peer_report r{.transport = e.transport};
  double total = 0, t = 0;
  for (int i = 0; i < rounds; ++i) {
    TROUPE_ASSIGN(t, echoed_batch(*c, local, remote, bytes));
    total += t;
  }
  r.write_gbps = double(bytes) * rounds / total / 1e9;
  std::vector<double> rtt;
  for (int i = 0; i < 51; ++i) {
    TROUPE_ASSIGN(t, echoed_batch(*c, local, remote, std::min<uint64_t>(4096, bytes)));
    rtt.push_back(t * 1e6);
  }
  std::nth_element(rtt.begin(), rtt.begin() + 25, rtt.end());
  r.round_trip_us = rtt[25];
  c.reset();
  TROUPE_TRY_VOID(transport->deregister(local));
  return r;
}

} // namespace

expected<std::vector<peer_report>> measure_peer(const std::string& peer, const std::string& host,
                                                uint64_t bytes, int rounds) {
  auto colon = peer.rfind(':');
  if (colon == std::string::npos)
    return make_error(errc::invalid_argument, "--peer '{}': expected host:port", peer);
  int fd = -1;
  TROUPE_ASSIGN(fd, tcp_socket(peer.substr(0, colon), peer.substr(colon + 1), false));
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string listing;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;)
    listing.append(buf, static_cast<size_t>(n));
  close(fd);
  std::vector<peer_report> out;
  for (size_t start = 0, end; (end = listing.find('\n', start)) != std::string::npos;
       start = end + 1) {
    std::string line = listing.substr(start, end - start);
    auto space = line.find(' ');
    auto e = endpoint_address::parse(line.substr(0, space));
    auto d = space == std::string::npos
                 ? expected<region_descriptor>(error{errc::parse_error, "no descriptor"})
                 : region_descriptor::parse(unhex(line.substr(space + 1)));
    if (!e || !d)
      return make_error(errc::parse_error, "peer {} sent '{}'", peer, line);
    auto r = measure_one(*e, *d, host, bytes, rounds);
    out.push_back(r ? *r : peer_report{.transport = e->transport, .error = r.error().to_string()});
  }
  if (out.empty())
    return make_error(errc::unavailable, "peer {} offered no endpoint", peer);
  return out;
}

} // namespace troupe::cluster::transfer
