// The libfabric transport in one process over the tcp provider on loopback: the same code path and
// registration modes as verbs. Both ends live here; each connection has its own progress thread.
#include <doctest/doctest.h>

#include <cstring>
#include <thread>
#include <vector>

#include "cluster/transfer/fabric_transport.hpp"
#include "silent_batches.hpp"
#include "transfer_test_util.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;
using troupe::errc;

namespace {

struct tcp_pair {
  std::unique_ptr<fabric_transport> a, b;
  std::unique_ptr<kv_connection> ab, ba; // a's end, b's end
};

tcp_pair connect_tcp(uint64_t max_write = 0) {
  tcp_pair p;
  auto a = fabric_transport::open({.provider = "tcp", .max_write = max_write});
  auto b = fabric_transport::open({.provider = "tcp", .max_write = max_write});
  REQUIRE_MESSAGE(a, a.error().to_string());
  REQUIRE_MESSAGE(b, b.error().to_string());
  p.a = std::move(*a);
  p.b = std::move(*b);
  auto address = p.b->listen(0);
  REQUIRE_MESSAGE(address, address.error().to_string());
  std::unique_ptr<kv_connection> accepted;
  std::thread acceptor([&] {
    auto c = p.b->accept(clock::now() + 5s);
    if (c)
      accepted = std::move(*c);
  });
  auto c = p.a->connect(*address, clock::now() + 5s);
  acceptor.join();
  REQUIRE_MESSAGE(c, c.error().to_string());
  REQUIRE(accepted);
  p.ab = std::move(*c);
  p.ba = std::move(accepted);
  return p;
}

} // namespace

TEST_CASE("transfer: fabric tcp writes 0, 1, unaligned and many small ranges, one notice each") {
  tcp_pair p = connect_tcp();
  std::vector<uint8_t> src(1 << 20), dst(1 << 20, 0);
  troupe::test::fill_pattern(src.data(), src.size(), 1);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 1, .locals = {*s}, .remotes = {*p.b->describe(*d)}};

  // 0 bytes: nothing is written, the notice still comes.
  auto id = p.ab->post(batch);
  REQUIRE(id);
  auto done = p.ab->wait(*id);
  REQUIRE(done);
  CHECK(done->posted_writes == 0);
  CHECK(p.ba->wait_notice(clock::now() + 5s)->lease_id == 1);

  // 1 byte, unaligned on both sides.
  batch.lease_id = 2;
  batch.ranges = {{0, 777, 0, 12345, 1}};
  done = p.ab->wait(*p.ab->post(batch));
  REQUIRE(done);
  auto notice = p.ba->wait_notice(clock::now() + 5s);
  REQUIRE(notice);
  CHECK(notice->lease_id == 2);
  CHECK(notice->bytes == 1);
  CHECK(dst[12345] == src[777]);
  CHECK(dst[12344] == 0);
  CHECK(dst[12346] == 0);

  // 4,000 ranges of 3 bytes at stride 5 (no coalescing possible) plus 256 contiguous 1 KiB blocks
  // (coalesced into one write): 4,001 posted writes, more than the tx queue holds at once.
  batch.lease_id = 3;
  batch.ranges.clear();
  for (uint64_t i = 0; i < 4000; ++i)
    batch.ranges.push_back({0, i * 5 + 1, 0, i * 5 + 2, 3});
  for (uint64_t i = 0; i < 256; ++i)
    batch.ranges.push_back({0, 65536 + i * 1024, 0, 524288 + i * 1024, 1024});
  done = p.ab->wait(*p.ab->post(batch));
  REQUIRE_MESSAGE(done, done.error().to_string());
  CHECK(done->posted_writes == 4001);
  CHECK(done->bytes == 4000 * 3 + 256 * 1024);
  CHECK(p.ba->wait_notice(clock::now() + 5s)->bytes == 4000 * 3 + 256 * 1024);
  bool ok = true;
  for (uint64_t i = 0; i < 4000; ++i)
    ok = ok && std::memcmp(&dst[i * 5 + 2], &src[i * 5 + 1], 3) == 0;
  CHECK(ok);
  CHECK(std::memcmp(&dst[524288], &src[65536], 256 * 1024) == 0);
  REQUIRE(p.a->deregister(*s));
  REQUIRE(p.b->deregister(*d));
}

TEST_CASE("transfer: fabric tcp: silent batches land, the last one notifies") {
  auto p = connect_tcp();
  test::check_silent_batches(*p.a, *p.b, *p.ab, *p.ba);
}

TEST_CASE("transfer: fabric splits a large range at max_write and refuses out-of-bounds ranges") {
  tcp_pair p = connect_tcp(1 << 20);
  std::vector<uint8_t> src(8 << 20), dst(8 << 20, 0);
  troupe::test::fill_pattern(src.data(), src.size(), 2);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  auto remote = *p.b->describe(*d);
  write_batch batch{.lease_id = 7, .locals = {*s}, .remotes = {remote}};
  batch.ranges = {{0, 0, 0, 0, (8 << 20) - 3}};
  auto done = p.ab->wait(*p.ab->post(batch));
  REQUIRE(done);
  CHECK(done->posted_writes == 8);
  CHECK(p.ba->wait_notice(clock::now() + 5s)->bytes == (8 << 20) - 3);
  CHECK(std::memcmp(dst.data(), src.data(), (8 << 20) - 3) == 0);

  // Out of bounds on the remote side: refused at post, nothing reaches the peer.
  std::fill(dst.begin(), dst.end(), 0);
  batch.ranges = {{0, 0, 0, 0, 100}, {0, 0, 0, (8 << 20) - 10, 11}};
  auto refused = p.ab->post(batch);
  REQUIRE(!refused);
  CHECK(refused.error().code() == errc::out_of_range);
  CHECK(p.ba->wait_notice(clock::now() + 100ms).error().code() == errc::timeout);
  CHECK(dst[0] == 0);
  CHECK(p.a->deregister(*s));
  CHECK(p.b->deregister(*d));
}

TEST_CASE("transfer: fabric cancel, deadline and a closed peer end the transfer quickly") {
  tcp_pair p = connect_tcp(1 << 20);
  std::vector<uint8_t> src(32 << 20, 3), dst(32 << 20, 0);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 11, .locals = {*s}, .remotes = {*p.b->describe(*d)}};
  for (int r = 0; r < 400; ++r) // 12.8 GiB: never finishes within the test
    batch.ranges.push_back({0, 0, 0, 0, src.size()});

  // Cancel: posted writes drain, the rest is never posted, the target gets a cancelled notice.
  auto id = p.ab->post(batch);
  REQUIRE(id);
  std::this_thread::sleep_for(30ms);
  p.ab->cancel(*id);
  auto t0 = clock::now();
  auto cancelled = p.ab->wait(*id);
  CHECK(clock::now() - t0 < 2s);
  REQUIRE(!cancelled);
  CHECK(cancelled.error().code() == errc::cancelled);
  auto notice = p.ba->wait_notice(clock::now() + 2s);
  REQUIRE(notice);
  CHECK(notice->lease_id == 11);
  CHECK(notice->cancelled);
  CHECK(notice->bytes < 400ull * src.size());

  // A deadline already past: refused without posting; the connection stays usable.
  batch.deadline = clock::now() - 1ms;
  CHECK(p.ab->wait(*p.ab->post(batch)).error().code() == errc::timeout);

  // A deadline in the middle: the error comes on time, the endpoint is closed (so nothing touches
  // the buffers any more) and the peer learns that the connection is gone.
  batch.deadline = clock::now() + 100ms;
  id = p.ab->post(batch);
  REQUIRE(id);
  auto late = p.ab->wait(*id);
  CHECK(clock::now() < batch.deadline + 1s); // margin for a loaded 2-core CI machine
  REQUIRE(!late);
  CHECK(late.error().code() == errc::timeout);
  auto lost = p.ba->wait_notice(clock::now() + 2s);
  REQUIRE(!lost);
  CHECK(lost.error().code() == errc::unavailable);
  CHECK(p.ab->post(batch).error().code() == errc::unavailable); // the closed connection refuses
  CHECK(p.a->deregister(*s));
  CHECK(p.b->deregister(*d));
  CHECK(p.a->registration_count() == 0);
  CHECK(p.b->registration_count() == 0);
}

TEST_CASE("transfer: provider choice is explicit: an absent provider names why, auto reports") {
  auto efa = fabric_transport::open({.provider = "efa"});
  REQUIRE(!efa);
  CHECK(efa.error().code() == errc::unavailable);
  CHECK(efa.error().message().find("efa") != std::string::npos);
  CHECK(!fabric_transport::open({.provider = "psm3"}));
  auto any = fabric_transport::open({.provider = "auto"});
  REQUIRE_MESSAGE(any, any.error().to_string());
  CHECK((*any)->choice().find((*any)->name()) == 0);
  CHECK((*any)->choice().find("auto") != std::string::npos);
  auto t = fabric_transport::open({.provider = "tcp"});
  REQUIRE(t);
  auto refused = (*t)->connect("127.0.0.1:1", clock::now() + 3s);
  REQUIRE(!refused);
  CHECK(refused.error().code() == errc::unavailable);
  CHECK((*t)->connect("no-port", clock::now() + 1s).error().code() == errc::invalid_argument);
}

TEST_CASE("transfer: fabric: one batch of more than 4 GiB (65 x the same 64 MiB)") {
  tcp_pair p = connect_tcp();
  const uint64_t chunk = 64 << 20, repeat = 65; // 4.06 GiB: byte counts past 32 bits
  std::vector<uint8_t> src(chunk), dst(chunk, 0);
  troupe::test::fill_pattern(src.data(), chunk, 4);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 1ull << 40, .locals = {*s}, .remotes = {*p.b->describe(*d)}};
  for (uint64_t r = 0; r < repeat; ++r)
    batch.ranges.push_back({0, 0, 0, 0, chunk});
  batch.deadline = clock::now() + 60s;
  auto done = p.ab->wait(*p.ab->post(batch));
  REQUIRE_MESSAGE(done, done.error().to_string());
  CHECK(done->bytes == chunk * repeat);
  CHECK(done->posted_writes == repeat); // overlapping, not contiguous: nothing to merge
  auto n = p.ba->wait_notice(clock::now() + 10s);
  REQUIRE(n);
  CHECK(n->lease_id == 1ull << 40);
  CHECK(n->bytes == chunk * repeat);
  CHECK(dst == src);
}
