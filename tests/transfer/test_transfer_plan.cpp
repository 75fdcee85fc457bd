// The write planner and region descriptors: bounds, coalescing, splitting, serialization.
#include <doctest/doctest.h>

#include <algorithm>

#include "cluster/transfer/write_plan.hpp"

using namespace troupe::cluster::transfer;
using troupe::errc;

TEST_CASE("transfer: a region descriptor round-trips through bytes and garbage is refused") {
  region_descriptor d{0x7f0012345000, 144 * 1024, 0xdeadbeefcafe, memory_kind::pinned_host};
  auto bytes = d.serialize();
  CHECK(bytes.size() == 32);
  auto back = region_descriptor::parse(bytes);
  REQUIRE(back);
  CHECK(*back == d);
  bytes[0] ^= 1;
  CHECK(region_descriptor::parse(bytes).error().code() == errc::parse_error);
  CHECK(region_descriptor::parse(std::span(bytes).first(31)).error().code() == errc::parse_error);
  auto wraps = region_descriptor{~uint64_t{0} - 10, 100, 1, memory_kind::host}.serialize();
  CHECK(!region_descriptor::parse(wraps));
}

TEST_CASE("transfer: a CUDA region's descriptor carries its IPC part as a second version") {
  auto host = parse_host_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  REQUIRE(host);
  CHECK(to_string(*host) == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  CHECK((*host)[0] == 0x0f);
  CHECK((*host)[15] == 0xf0);
  cuda_ipc_part ipc{.offset = 4096, .device = 3, .host = *host};
  for (size_t i = 0; i < ipc.handle.size(); ++i)
    ipc.handle[i] = static_cast<uint8_t>(i * 7 + 1);
  region_descriptor d{0x7f0012345000, 1 << 20, 9, memory_kind::cuda, ipc};
  auto bytes = d.serialize();
  CHECK(bytes.size() == 128);
  auto back = region_descriptor::parse(bytes);
  REQUIRE_MESSAGE(back, back.error().to_string());
  CHECK(*back == d);
  REQUIRE(back->ipc);
  CHECK(back->ipc->handle == ipc.handle);
  // Without the IPC part the first version is written, and still read.
  region_descriptor plain = d;
  plain.ipc.reset();
  auto old = plain.serialize();
  CHECK(old.size() == 32);
  CHECK(std::equal(old.begin() + 4, old.end(), bytes.begin() + 4));
  auto old_back = region_descriptor::parse(old);
  REQUIRE(old_back);
  CHECK(!old_back->ipc);
  CHECK(*old_back == plain);
  // Malformed second versions.
  auto bad = [&](auto edit) {
    auto b = bytes;
    edit(b);
    auto r = region_descriptor::parse(b);
    return !r && r.error().code() == troupe::errc::parse_error;
  };
  CHECK(bad([](auto& b) { b[0] = 0x31; }));                     // "TKV1" magic with 128 bytes
  CHECK(bad([](auto& b) { b.resize(127); }));                   // cut short
  CHECK(bad([](auto& b) { b.push_back(0); }));                  // too long
  CHECK(bad([](auto& b) { b[4] = 0; }));                        // an IPC part on host memory
  CHECK(bad([](auto& b) { b[5] = 1; }));                        // reserved byte
  CHECK(bad([](auto& b) { b[44] = 1; }));                       // reserved bytes after the device
  CHECK(bad([](auto& b) { b[43] = 0x80; }));                    // negative device
  CHECK(bad([](auto& b) { std::fill(&b[32], &b[40], 0xff); })); // offset + length wraps
  auto v1_magic_long = old;
  v1_magic_long[0] = 0x32; // "TKV2" with 32 bytes
  CHECK(!region_descriptor::parse(v1_magic_long));
  // Boot ids: 32 lowercase hex digits, dashes anywhere.
  CHECK(!parse_host_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f"));
  CHECK(!parse_host_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00"));
  CHECK(!parse_host_id("0F1E2D3C-4b5a-6978-8796-a5b4c3d2e1f0"));
  CHECK(!parse_host_id(""));
  auto here = this_host_id();
  REQUIRE_MESSAGE(here, here.error().to_string()); // Linux: every test host has one
  CHECK(*here != host_id{});
  CHECK(this_host_id().value() == *here);
}

TEST_CASE("transfer: the plan refuses ranges outside either registration") {
  write_batch b{.lease_id = 1, .locals = {7}, .remotes = {{0x1000, 100, 1, memory_kind::host}}};
  uint64_t local_len[] = {200};
  b.ranges = {{0, 0, 0, 50, 51}}; // remote end 101 > 100
  CHECK(plan_writes(b, local_len, 1 << 20).error().code() == errc::out_of_range);
  b.ranges = {{0, 150, 0, 0, 51}}; // local end 201 > 200
  CHECK(plan_writes(b, local_len, 1 << 20).error().code() == errc::out_of_range);
  b.ranges = {{0, 0, 0, ~uint64_t{0}, 2}}; // offset + length overflows
  CHECK(plan_writes(b, local_len, 1 << 20).error().code() == errc::out_of_range);
  b.ranges = {{0, 0, 1, 0, 1}}; // no remote #1
  CHECK(plan_writes(b, local_len, 1 << 20).error().code() == errc::invalid_argument);
  b.ranges = {{0, 0, 0, 0, 100}, {0, 100, 0, 0, 100}};
  CHECK(plan_writes(b, local_len, 1 << 20));
}

TEST_CASE("transfer: the plan coalesces contiguous ranges, drops empty ones, splits at max_write") {
  write_batch b{.lease_id = 1, .locals = {1}, .remotes = {{0x1000, 1 << 20, 1, memory_kind::host}}};
  uint64_t local_len[] = {1 << 20};
  // 16 blocks of 4 KiB given out of order, contiguous on both sides: one write.
  for (int i = 15; i >= 0; --i)
    b.ranges.push_back({0, uint64_t(i) * 4096, 0, 8192 + uint64_t(i) * 4096, 4096});
  b.ranges.push_back({0, 0, 0, 0, 0});
  auto plan = plan_writes(b, local_len, 1 << 20);
  REQUIRE(plan);
  REQUIRE(plan->size() == 1);
  CHECK((*plan)[0].local_offset == 0);
  CHECK((*plan)[0].remote_offset == 8192);
  CHECK((*plan)[0].length == 65536);
  // A gap on the remote side breaks the run: two writes.
  b.ranges.push_back({0, 65536, 0, 8192 + 65536 + 1, 10});
  b.ranges.push_back({0, 65546, 0, 8192 + 65536 + 11, 10});
  plan = plan_writes(b, local_len, 1 << 20);
  REQUIRE(plan);
  CHECK(plan->size() == 2);
  CHECK(total_bytes(*plan) == 65536 + 20);
  // Split at 10 000 bytes: ceil(65536 / 10000) = 7 writes, plus the 20-byte one.
  plan = plan_writes(b, local_len, 10000);
  REQUIRE(plan);
  CHECK(plan->size() == 8);
  CHECK(total_bytes(*plan) == 65536 + 20);
}

TEST_CASE("transfer: an endpoint address round-trips as transport@host:port") {
  endpoint_address e{"verbs", "10.0.0.2:7000"};
  CHECK(e.serialize() == "verbs@10.0.0.2:7000");
  auto back = endpoint_address::parse(e.serialize());
  REQUIRE(back);
  CHECK(*back == e);
  CHECK(endpoint_address::parse("socket@host-1:1")->transport == "socket");
  CHECK(endpoint_address::parse("ucx@10.0.0.2:7000").error().code() == errc::parse_error);
  CHECK(!endpoint_address::parse("verbs10.0.0.2:7000"));
  CHECK(!endpoint_address::parse("tcp@10.0.0.2"));
  CHECK(!endpoint_address::parse("tcp@10.0.0.2:70x"));
}
