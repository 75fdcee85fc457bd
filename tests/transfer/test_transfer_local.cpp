// The same-process transport: writes, notices, bounds, cancel and deadline.
#include <doctest/doctest.h>

#include <thread>
#include <vector>

#include "cluster/transfer/local_transport.hpp"
#include "silent_batches.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;
using troupe::errc;

TEST_CASE("transfer: local writes land, one notice per batch, bounds and liveness checked") {
  auto a = std::make_shared<local_transport>(), b = std::make_shared<local_transport>();
  std::vector<uint8_t> src(10000), dst(10000, 0);
  for (size_t i = 0; i < src.size(); ++i)
    src[i] = uint8_t(i * 7 + 1);
  auto s = a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  auto [ab, ba] = local_transport::connect_pair(a, b);
  write_batch batch{.lease_id = 9, .locals = {*s}, .remotes = {*b->describe(*d)}};
  batch.ranges = {{0, 1, 0, 3, 4097}, {0, 4098, 0, 4100, 1}, {0, 9000, 0, 0, 0}};
  auto id = ab->post(batch);
  REQUIRE(id);
  auto done = ab->wait(*id);
  REQUIRE(done);
  CHECK(done->bytes == 4098);
  CHECK(done->posted_writes == 1); // both ranges are contiguous on both sides
  auto notice = ba->wait_notice(clock::now() + 5s);
  REQUIRE(notice);
  CHECK(notice->lease_id == 9);
  CHECK(notice->bytes == 4098);
  CHECK(!notice->cancelled);
  CHECK(dst[2] == 0);
  CHECK(std::equal(src.begin() + 1, src.begin() + 4099, dst.begin() + 3));
  CHECK(dst[4101] == 0);

  batch.ranges = {{0, 0, 0, 9999, 2}};
  CHECK(ab->post(batch).error().code() == errc::out_of_range);
  CHECK(ba->wait_notice(clock::now() + 50ms).error().code() == errc::timeout);
  REQUIRE(b->deregister(*d));
  batch.ranges = {{0, 0, 0, 0, 2}};
  CHECK(ab->post(batch).error().code() == errc::not_found); // the peer deregistered it
  REQUIRE(a->deregister(*s));
  CHECK(a->registration_count() == 0);
}

TEST_CASE("transfer: local: silent batches land, the last one notifies") {
  auto a = std::make_shared<local_transport>(), b = std::make_shared<local_transport>();
  auto [ab, ba] = local_transport::connect_pair(a, b);
  test::check_silent_batches(*a, *b, *ab, *ba);
}

TEST_CASE("transfer: local cancel and deadline fail the batch and send a cancelled notice") {
  auto a = std::make_shared<local_transport>(), b = std::make_shared<local_transport>();
  std::vector<uint8_t> src(64 << 20, 1), dst(64 << 20, 0);
  auto s = a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  auto [ab, ba] = local_transport::connect_pair(a, b, 1 << 20);
  write_batch batch{.lease_id = 5, .locals = {*s}, .remotes = {*b->describe(*d)}};
  for (int r = 0; r < 200; ++r) // 12.8 GB of 1 MiB memcpys: far longer than the test waits
    batch.ranges.push_back({0, 0, 0, 0, src.size()});
  auto id = ab->post(batch);
  REQUIRE(id);
  CHECK(a->deregister(*s).error().code() == errc::invalid_argument); // in use
  std::this_thread::sleep_for(20ms);
  ab->cancel(*id);
  auto t0 = clock::now();
  CHECK(ab->wait(*id).error().code() == errc::cancelled);
  CHECK(clock::now() - t0 < 1s);
  auto notice = ba->wait_notice(clock::now() + 1s);
  REQUIRE(notice);
  CHECK(notice->cancelled);

  batch.deadline = clock::now() + 50ms;
  id = ab->post(batch);
  REQUIRE(id);
  CHECK(ab->wait(*id).error().code() == errc::timeout);
  CHECK(clock::now() < batch.deadline + 1s); // margin for a loaded 2-core CI machine
  CHECK(ba->wait_notice(clock::now() + 1s)->cancelled);
  CHECK(a->deregister(*s));
  CHECK(b->deregister(*d));
}
