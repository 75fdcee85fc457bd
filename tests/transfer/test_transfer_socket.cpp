// The socket transport (plain TCP, gathered sendmsg / scattered readv) on loopback: the same
// semantics as the fabric transport.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cluster/transfer/socket_connection.hpp"
#include "cluster/transfer/socket_transport.hpp"
#include "engine/backend/cuda/cuda_device.hpp"
#include "silent_batches.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;
using troupe::errc;

namespace {
struct socket_pair {
  std::shared_ptr<socket_transport> a = socket_transport::create(), b = socket_transport::create();
  std::unique_ptr<kv_connection> ab, ba;
  socket_pair() {
    auto address = b->listen(0);
    REQUIRE(address);
    std::thread acceptor([&] {
      auto c = b->accept(clock::now() + 5s);
      if (c)
        ba = std::move(*c);
    });
    auto c = a->connect(*address, clock::now() + 5s);
    acceptor.join();
    REQUIRE_MESSAGE(c, c.error().to_string());
    REQUIRE(ba);
    ab = std::move(*c);
  }
};
} // namespace

TEST_CASE("transfer: socket transport writes 0, 1, unaligned and 5,000 scattered ranges") {
  socket_pair p;
  std::vector<uint8_t> src(1 << 20), dst(1 << 20, 0);
  for (size_t i = 0; i < src.size(); ++i)
    src[i] = uint8_t(i * 13 + 5);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 1, .locals = {*s}, .remotes = {*p.b->describe(*d)}};
  REQUIRE(p.ab->wait(*p.ab->post(batch)));
  CHECK(p.ba->wait_notice(clock::now() + 5s)->bytes == 0);
  batch.lease_id = 2;
  batch.ranges = {{0, 777, 0, 12345, 1}};
  REQUIRE(p.ab->wait(*p.ab->post(batch)));
  CHECK(p.ba->wait_notice(clock::now() + 5s)->lease_id == 2);
  CHECK(dst[12345] == src[777]);
  CHECK(dst[12346] == 0);
  batch.lease_id = 3;
  batch.ranges.clear();
  for (uint64_t i = 0; i < 5000; ++i)
    batch.ranges.push_back({0, i * 7 + 3, 0, i * 9 + 1, 5});
  auto done = p.ab->wait(*p.ab->post(batch));
  REQUIRE(done);
  CHECK(done->bytes == 25000);
  CHECK(done->posted_writes == 10); // 5,000 ranges in segments of 512
  auto n = p.ba->wait_notice(clock::now() + 5s);
  REQUIRE(n);
  CHECK(n->bytes == 25000);
  bool ok = true;
  for (uint64_t i = 0; i < 5000; ++i)
    ok = ok && std::memcmp(&dst[i * 9 + 1], &src[i * 7 + 3], 5) == 0;
  CHECK(ok);
  batch.ranges = {{0, 0, 0, (1 << 20) - 1, 2}};
  CHECK(p.ab->post(batch).error().code() == errc::out_of_range);
  CHECK(p.a->deregister(*s));
  CHECK(p.b->deregister(*d));
}

TEST_CASE("transfer: socket transport: silent batches land, the last one notifies") {
  socket_pair p;
  test::check_silent_batches(*p.a, *p.b, *p.ab, *p.ba);
}

TEST_CASE("transfer: socket transport cancel and deadline") {
  socket_pair p;
  std::vector<uint8_t> src(32 << 20, 3), dst(32 << 20, 0);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 11, .locals = {*s}, .remotes = {*p.b->describe(*d)}};
  for (int r = 0; r < 400; ++r)
    batch.ranges.push_back({0, 0, 0, 0, src.size()});
  auto id = p.ab->post(batch);
  REQUIRE(id);
  std::this_thread::sleep_for(30ms);
  p.ab->cancel(*id);
  auto t0 = clock::now();
  CHECK(p.ab->wait(*id).error().code() == errc::cancelled);
  CHECK(clock::now() - t0 < 2s);
  auto notice = p.ba->wait_notice(clock::now() + 2s);
  REQUIRE(notice);
  CHECK(notice->cancelled);
  // The deadline: on time; between segments the peer gets a cancelled notice, inside a segment the
  // connection closes and the peer's wait_notice fails instead.
  batch.deadline = clock::now() + 100ms;
  id = p.ab->post(batch);
  REQUIRE(id);
  CHECK(p.ab->wait(*id).error().code() == errc::timeout);
  CHECK(clock::now() < batch.deadline + 1s); // margin for a loaded 2-core CI machine
  auto after = p.ba->wait_notice(clock::now() + 2s);
  CHECK((after ? after->cancelled : after.error().code() == errc::unavailable));
}

TEST_CASE("transfer: socket transport: the target going away fails the transfer, not hangs") {
  socket_pair p;
  std::vector<uint8_t> src(32 << 20, 3), dst(32 << 20, 0);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch batch{.lease_id = 12, .locals = {*s}, .remotes = {*p.b->describe(*d)}};
  for (int r = 0; r < 400; ++r)
    batch.ranges.push_back({0, 0, 0, 0, src.size()});
  batch.deadline = clock::now() + 20s;
  auto id = p.ab->post(batch);
  REQUIRE(id);
  std::this_thread::sleep_for(30ms);
  p.ba.reset();
  auto t0 = clock::now();
  CHECK(p.ab->wait(*id).error().code() == errc::unavailable);
  // Well before the 20 s deadline (the bound is loose: a loaded 2-core CI machine under ASan).
  CHECK(clock::now() - t0 < 10s);
  CHECK(p.a->deregister(*s));
  CHECK(p.b->deregister(*d));
}

TEST_CASE("transfer: socket transport: one batch of more than 4 GiB (65 x the same 64 MiB)") {
  socket_pair p;
  const uint64_t chunk = 64 << 20, repeat = 65; // 4.06 GiB: byte counts past 32 bits
  std::vector<uint8_t> src(chunk), dst(chunk, 0);
  for (uint64_t i = 0; i < chunk; i += 4096)
    src[i] = uint8_t(i >> 12);
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
  auto n = p.ba->wait_notice(clock::now() + 10s);
  REQUIRE(n);
  CHECK(n->lease_id == 1ull << 40);
  CHECK(n->bytes == chunk * repeat);
  CHECK(dst == src);
}

TEST_CASE("transfer: socket transport: GPU memory only in CUDA IPC mode, where CUDA is usable") {
  auto plain = socket_transport::create();
  CHECK(!plain->cuda_ipc());
  std::vector<uint8_t> buf(4096);
  auto id = plain->register_memory(buf.data(), buf.size(), memory_kind::cuda);
  REQUIRE(!id);
  CHECK(id.error().code() == errc::unsupported);
  CHECK(id.error().message().find("CUDA IPC mode") != std::string::npos);
  auto ipc = socket_transport::create_with_cuda_ipc();
  auto devices = troupe::engine::cuda_devices();
  const bool gpu = devices && !devices->empty();
  CHECK(ipc.has_value() == gpu);
  if (!gpu) {
    MESSAGE("no CUDA device here: " << ipc.error().to_string());
    CHECK(ipc.error().message().find("CUDA IPC mode") != std::string::npos);
  } else {
    CHECK((*ipc)->cuda_ipc());
    // Host memory registers as before; host memory called GPU memory does not export.
    CHECK((*ipc)->register_memory(buf.data(), buf.size(), memory_kind::host));
    CHECK(!(*ipc)->register_memory(buf.data(), buf.size(), memory_kind::cuda));
  }
}

TEST_CASE(
    "transfer: socket transport refuses a peer's GPU region it cannot write, before posting") {
  socket_pair p;
  std::vector<uint8_t> src(1 << 16, 7), dst(1 << 16, 0);
  auto s = p.a->register_memory(src.data(), src.size(), memory_kind::host);
  auto d = p.b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  auto here = this_host_id();
  REQUIRE(here);
  host_id elsewhere = *here;
  elsewhere[0] ^= 0xff;
  region_descriptor gpu = *p.b->describe(*d);
  gpu.kind = memory_kind::cuda;
  auto refused = [&](const region_descriptor& remote, std::string_view why) {
    write_batch batch{.lease_id = 5, .locals = {*s}, .remotes = {remote}};
    batch.ranges = {{0, 0, 0, 0, 100}};
    auto posted = p.ab->post(batch);
    if (posted) {
      FAIL_CHECK("posted");
      return;
    }
    CHECK(posted.error().code() == errc::unsupported);
    CHECK_MESSAGE(posted.error().message().find(why) != std::string::npos,
                  posted.error().message());
  };
  refused(gpu, "without a CUDA IPC handle");
  gpu.ipc = cuda_ipc_part{.offset = 0, .device = 0, .host = elsewhere};
  refused(gpu, "another host (boot id " + to_string(elsewhere));
  gpu.ipc->host = *here;
  refused(gpu, "not in CUDA IPC mode");
  // Nothing was sent, nothing is still held.
  CHECK(p.ba->wait_notice(clock::now() + 200ms).error().code() == errc::timeout);
  CHECK(dst[0] == 0);
  CHECK(p.a->deregister(*s));
  CHECK(p.b->deregister(*d));
}

// The wire side of CUDA IPC writes, without a GPU: a segment flagged as written by the sender
// carries its range table and no payload; the reader checks and counts the ranges and stays in
// step with the stream; an unknown flag ends the connection.
TEST_CASE("transfer: socket transport: segments written by the sender carry no payload") {
  using namespace troupe::cluster::transfer::detail;
  auto b = socket_transport::create();
  std::vector<uint8_t> dst(4096, 0);
  auto d = b->register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE(d);
  auto address = b->listen(0);
  REQUIRE(address);
  const auto port = static_cast<uint16_t>(std::stoi(address->substr(address->rfind(':') + 1)));
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0);
  auto conn = b->accept(clock::now() + 5s);
  REQUIRE(conn);
  auto send_all = [&](const void* data, size_t n) {
    REQUIRE(::send(fd, data, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n));
  };
  const uint64_t key = b->describe(*d)->key;
  segment_header written{segment_magic, flag_last | flag_written, 1, 2};
  wire_range ranges[2] = {{key, 10, 100}, {key, 1000, 24}};
  send_all(&written, sizeof written);
  send_all(ranges, sizeof ranges);
  segment_header with_payload{segment_magic, flag_last, 2, 1};
  wire_range one{key, 0, 4};
  const uint8_t payload[4] = {1, 2, 3, 4};
  send_all(&with_payload, sizeof with_payload);
  send_all(&one, sizeof one);
  send_all(payload, sizeof payload);
  auto first = (*conn)->wait_notice(clock::now() + 5s);
  REQUIRE_MESSAGE(first, first.error().to_string());
  CHECK(first->lease_id == 1);
  CHECK(first->bytes == 124);
  CHECK(!first->cancelled);
  auto second = (*conn)->wait_notice(clock::now() + 5s);
  REQUIRE_MESSAGE(second, second.error().to_string());
  CHECK(second->lease_id == 2);
  CHECK(second->bytes == 4);
  CHECK(std::vector<uint8_t>(dst.begin(), dst.begin() + 4) == std::vector<uint8_t>{1, 2, 3, 4});
  CHECK(std::all_of(dst.begin() + 4, dst.end(), [](uint8_t v) { return v == 0; }));
  segment_header unknown{segment_magic, flag_last | 16, 3, 0};
  send_all(&unknown, sizeof unknown);
  auto broken = (*conn)->wait_notice(clock::now() + 5s);
  REQUIRE(!broken);
  CHECK(broken.error().code() != errc::timeout);
  close(fd);
  conn->reset();
  CHECK(b->deregister(*d));
}
