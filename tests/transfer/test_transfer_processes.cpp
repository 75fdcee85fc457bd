// The libfabric (tcp provider) and socket transports across processes on loopback: a peer process
// writes into this one, and a peer SIGKILLed mid transfer ends the transfer within its deadline.
#include <doctest/doctest.h>

#include <cstdlib>
#include <memory>
#include <thread>

#include "cluster/transfer/fabric_transport.hpp"
#include "cluster/transfer/socket_transport.hpp"
#include "transfer_test_util.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;
using troupe::errc;
using troupe::test::child_process;

namespace {
const std::string peer_bin = TROUPE_TRANSFER_PEER_BIN;

std::string field(const std::string& line, const std::string& key) {
  REQUIRE_MESSAGE(line.rfind(key + " ", 0) == 0,
                  "expected '" << key << " ...', got '" << line << "'");
  return line.substr(key.size() + 1);
}
} // namespace

TEST_CASE("transfer: a peer process writes into our registration and notifies once") {
  auto t = fabric_transport::open({.provider = "tcp"});
  REQUIRE(t);
  const uint64_t bytes = 3 * 1024 * 1024 + 5;
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = (*t)->register_memory(buffer.get(), bytes, memory_kind::host);
  auto address = (*t)->listen(0);
  REQUIRE((id && address));
  std::string desc = troupe::test::to_hex((*t)->describe(*id)->serialize());
  child_process child({peer_bin, "initiator", *address, desc, std::to_string(bytes), "2", "9"});
  auto conn = (*t)->accept(clock::now() + 10s);
  REQUIRE_MESSAGE(conn, conn.error().to_string());
  auto notice = (*conn)->wait_notice(clock::now() + 20s);
  REQUIRE_MESSAGE(notice, notice.error().to_string());
  CHECK(notice->lease_id == 4242);
  CHECK(notice->bytes == 2 * bytes);
  CHECK(!notice->cancelled);
  CHECK(troupe::test::has_pattern(buffer.get(), bytes, 9));
  CHECK(child.read_line(5000) == "CONNECTED");
  CHECK(child.read_line(5000) == "POSTED");
  CHECK(field(child.read_line(5000), "DONE") == std::to_string(2 * bytes) + " 2");
  CHECK(child.wait_exit() == 0);
}

TEST_CASE("transfer: a target SIGKILLed mid transfer fails the initiator's wait well within the "
          "deadline") {
  const uint64_t bytes = 64 << 20;
  child_process child({peer_bin, "target", std::to_string(bytes), "1"});
  std::string address = field(child.read_line(10000), "ADDR");
  auto remote =
      region_descriptor::parse(troupe::test::from_hex(field(child.read_line(5000), "DESC")));
  REQUIRE(remote);
  auto t = fabric_transport::open({.provider = "tcp", .max_write = 1 << 20});
  REQUIRE(t);
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = (*t)->register_memory(buffer.get(), bytes, memory_kind::host);
  auto conn = (*t)->connect(address, clock::now() + 10s);
  REQUIRE_MESSAGE(conn, conn.error().to_string());
  write_batch batch{.lease_id = 77, .locals = {*id}, .remotes = {*remote}};
  for (int r = 0; r < 200; ++r) // 12.5 GiB: still running when the peer dies
    batch.ranges.push_back({0, 0, 0, 0, bytes});
  batch.deadline = clock::now() + 20s;
  auto posted = (*conn)->post(batch);
  REQUIRE(posted);
  std::this_thread::sleep_for(100ms);
  child.kill_now();
  auto t0 = clock::now();
  auto result = (*conn)->wait(*posted);
  CHECK(clock::now() - t0 < 3s);
  REQUIRE(!result);
  CHECK(result.error().code() == errc::unavailable);
  MESSAGE(result.error().to_string());
  CHECK((*t)->deregister(*id));
  CHECK((*t)->registration_count() == 0);
}

TEST_CASE("transfer: an initiator SIGKILLed mid transfer: the target learns it and frees its "
          "registration") {
  auto t = fabric_transport::open({.provider = "tcp"});
  REQUIRE(t);
  const uint64_t bytes = 64 << 20;
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = (*t)->register_memory(buffer.get(), bytes, memory_kind::host);
  auto address = (*t)->listen(0);
  REQUIRE((id && address));
  std::string desc = troupe::test::to_hex((*t)->describe(*id)->serialize());
  child_process child({peer_bin, "initiator", *address, desc, std::to_string(bytes), "200", "3"});
  auto conn = (*t)->accept(clock::now() + 10s);
  REQUIRE_MESSAGE(conn, conn.error().to_string());
  CHECK(child.read_line(5000) == "CONNECTED");
  CHECK(child.read_line(5000) == "POSTED");
  std::this_thread::sleep_for(100ms);
  child.kill_now();
  auto t0 = clock::now();
  auto notice = (*conn)->wait_notice(clock::now() + 10s);
  CHECK(clock::now() - t0 < 3s);
  REQUIRE(!notice);
  CHECK(notice.error().code() == errc::unavailable);
  CHECK((*t)->deregister(*id));
  CHECK((*t)->registration_count() == 0);
}

TEST_CASE("transfer: socket transport: an initiator process SIGKILLed mid transfer is noticed") {
  auto t = socket_transport::create();
  const uint64_t bytes = 64 << 20;
  auto buffer = std::make_unique<uint8_t[]>(bytes);
  auto id = t->register_memory(buffer.get(), bytes, memory_kind::host);
  auto address = t->listen(0);
  REQUIRE((id && address));
  std::string desc = troupe::test::to_hex(t->describe(*id)->serialize());
  setenv("TRANSFER_KIND", "socket", 1); // the child inherits it
  child_process child({peer_bin, "initiator", *address, desc, std::to_string(bytes), "200", "3"});
  unsetenv("TRANSFER_KIND");
  auto conn = t->accept(clock::now() + 10s);
  REQUIRE_MESSAGE(conn, conn.error().to_string());
  CHECK(child.read_line(5000) == "CONNECTED");
  CHECK(child.read_line(5000) == "POSTED");
  std::this_thread::sleep_for(100ms);
  child.kill_now();
  auto t0 = clock::now();
  auto notice = (*conn)->wait_notice(clock::now() + 10s);
  CHECK(clock::now() - t0 < 3s);
  REQUIRE(!notice);
  CHECK(notice.error().code() == errc::unavailable);
  CHECK(t->deregister(*id));
  CHECK(t->registration_count() == 0);
}
