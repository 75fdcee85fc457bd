// The other process of the cross-process transfer tests (tcp provider on loopback):
//   transfer_peer target BYTES SEED                       listen, print ADDR/DESC, await one notice
//   transfer_peer initiator ADDR DESC BYTES REPEAT SEED   write BYTES × REPEAT into DESC, await
//   completion
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "cluster/transfer/fabric_transport.hpp"
#include "transfer_test_util.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

int fail(const troupe::error& e) {
  std::printf("ERROR %s\n", e.to_string().c_str());
  std::fflush(stdout);
  return 1;
}

int run_target(uint64_t bytes, uint64_t seed) {
  auto t = fabric_transport::open({.provider = "tcp"});
  if (!t)
    return fail(t.error());
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = (*t)->register_memory(buffer.get(), bytes, memory_kind::host);
  auto address = (*t)->listen(0);
  if (!id || !address)
    return fail(!id ? id.error() : address.error());
  std::printf("ADDR %s\nDESC %s\n", address->c_str(),
              troupe::test::to_hex((*t)->describe(*id)->serialize()).c_str());
  std::fflush(stdout);
  auto conn = (*t)->accept(clock::now() + 10s);
  if (!conn)
    return fail(conn.error());
  auto notice = (*conn)->wait_notice(clock::now() + 30s);
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
  auto t = fabric_transport::open({.provider = "tcp"});
  if (!remote || !t)
    return fail(!remote ? remote.error() : t.error());
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  troupe::test::fill_pattern(buffer.get(), bytes, seed);
  auto id = (*t)->register_memory(buffer.get(), bytes, memory_kind::host);
  auto conn = (*t)->connect(address, clock::now() + 10s);
  if (!id || !conn)
    return fail(!id ? id.error() : conn.error());
  std::printf("CONNECTED\n");
  write_batch batch{.lease_id = 4242, .locals = {*id}, .remotes = {*remote}};
  for (uint64_t r = 0; r < repeat; ++r)
    batch.ranges.push_back({0, 0, 0, 0, bytes});
  batch.deadline = clock::now() + 60s;
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
