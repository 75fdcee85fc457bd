// The other process of the cross-process transfer tests (tcp provider on loopback):
//   transfer_peer target BYTES SEED                       listen, print ADDR/DESC, await one notice
//   transfer_peer initiator ADDR DESC BYTES REPEAT SEED   write BYTES × REPEAT into DESC, await
//   completion
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include <functional>

#include "cluster/transfer/fabric_transport.hpp"
#include "cluster/transfer/socket_transport.hpp"
#include "transfer_test_util.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

std::string local_host() {
  const char* h = std::getenv("TRANSFER_HOST");
  return h ? h : "127.0.0.1";
}
std::chrono::milliseconds env_ms(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return std::chrono::milliseconds(v ? std::atoi(v) : fallback);
}

// Either transport behind one face: the tests run the same scenarios over both.
struct endpoint {
  std::shared_ptr<kv_transport> transport;
  std::function<troupe::expected<std::string>(uint16_t)> listen;
  std::function<troupe::expected<std::unique_ptr<kv_connection>>(clock::time_point)> accept;
  std::function<troupe::expected<std::unique_ptr<kv_connection>>(const std::string&,
                                                                 clock::time_point)>
      connect;
};

template <class T>
endpoint make_endpoint(std::shared_ptr<T> t) {
  return {t, [t](uint16_t port) { return t->listen(port); },
          [t](clock::time_point d) { return t->accept(d); },
          [t](const std::string& a, clock::time_point d) { return t->connect(a, d); }};
}

troupe::expected<endpoint> open_endpoint() {
  const char* kind = std::getenv("TRANSFER_KIND");
  if (kind && std::string(kind) == "socket")
    return make_endpoint(socket_transport::create(local_host()));
  auto t = fabric_transport::open({.provider = "tcp", .host = local_host()});
  if (!t)
    return std::move(t).error();
  return make_endpoint(std::shared_ptr<fabric_transport>(std::move(*t)));
}

int fail(const troupe::error& e) {
  std::printf("ERROR %s\n", e.to_string().c_str());
  std::fflush(stdout);
  return 1;
}

int run_target(uint64_t bytes, uint64_t seed) {
  auto t = open_endpoint();
  if (!t)
    return fail(t.error());
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = t->transport->register_memory(buffer.get(), bytes, memory_kind::host);
  auto address = t->listen(0);
  if (!id || !address)
    return fail(!id ? id.error() : address.error());
  std::printf("ADDR %s\nDESC %s\n", address->c_str(),
              troupe::test::to_hex(t->transport->describe(*id)->serialize()).c_str());
  std::fflush(stdout);
  auto conn = t->accept(clock::now() + 10s);
  if (!conn)
    return fail(conn.error());
  auto notice = (*conn)->wait_notice(clock::now() + env_ms("TRANSFER_NOTICE_MS", 30000));
  if (!notice)
    return fail(notice.error());
  bool ok = troupe::test::has_pattern(buffer.get(), bytes, seed);
  std::printf("NOTICE %llu %llu %d\nCHECK %s\n", (unsigned long long)notice->lease_id,
              (unsigned long long)notice->bytes, notice->cancelled ? 1 : 0, ok ? "ok" : "bad");
  std::fflush(stdout);
  return 0;
}

int run_initiator(const std::string& address, const std::string& desc_hex, uint64_t bytes,
                  uint64_t repeat, uint64_t seed) {
  auto remote = region_descriptor::parse(troupe::test::from_hex(desc_hex));
  auto t = open_endpoint();
  if (!remote || !t)
    return fail(!remote ? remote.error() : t.error());
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  troupe::test::fill_pattern(buffer.get(), bytes, seed);
  auto id = t->transport->register_memory(buffer.get(), bytes, memory_kind::host);
  auto conn = t->connect(address, clock::now() + 10s);
  if (!id || !conn)
    return fail(!id ? id.error() : conn.error());
  std::printf("CONNECTED\n");
  write_batch batch{.lease_id = 4242, .locals = {*id}, .remotes = {*remote}};
  for (uint64_t r = 0; r < repeat; ++r)
    batch.ranges.push_back({0, 0, 0, 0, bytes});
  batch.deadline = clock::now() + env_ms("TRANSFER_DEADLINE_MS", 60000);
  auto posted = (*conn)->post(std::move(batch));
  if (!posted)
    return fail(posted.error());
  std::printf("POSTED\n");
  std::fflush(stdout);
  auto done = (*conn)->wait(*posted);
  if (!done)
    return fail(done.error());
  std::printf("DONE %llu %llu\n", (unsigned long long)done->bytes,
              (unsigned long long)done->posted_writes);
  std::fflush(stdout);
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "target" && argc == 4)
    return run_target(std::strtoull(argv[2], nullptr, 10), std::strtoull(argv[3], nullptr, 10));
  if (mode == "initiator" && argc == 7)
    return run_initiator(argv[2], argv[3], std::strtoull(argv[4], nullptr, 10),
                         std::strtoull(argv[5], nullptr, 10), std::strtoull(argv[6], nullptr, 10));
  std::fprintf(stderr,
               "usage: transfer_peer target BYTES SEED | initiator ADDR DESC BYTES REPEAT SEED\n");
  return 2;
}
