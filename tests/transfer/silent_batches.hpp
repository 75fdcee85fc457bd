// One transfer posted as several batches (write_batch::notify): the silent ones land without a
// completion notice, the last one notifies once, after everything before it. Every transport.
#pragma once

#include <doctest/doctest.h>

#include <numeric>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer::test {

inline void check_silent_batches(kv_transport& a, kv_transport& b, kv_connection& ab,
                                 kv_connection& ba) {
  using namespace std::chrono_literals;
  std::vector<uint8_t> src(4096), dst(4096, 0);
  std::iota(src.begin(), src.end(), uint8_t{1});
  auto s = a.register_memory(src.data(), src.size(), memory_kind::host);
  auto d = b.register_memory(dst.data(), dst.size(), memory_kind::host);
  REQUIRE((s && d));
  write_batch first{.lease_id = 7,
                    .locals = {*s},
                    .remotes = {*b.describe(*d)},
                    .ranges = {{0, 0, 0, 0, 1000}},
                    .notify = false};
  write_batch second = first, last = first;
  second.ranges = {{0, 1000, 0, 1000, 1000}};
  last.ranges = {{0, 2000, 0, 2000, 2096}};
  last.notify = true;
  REQUIRE(ab.wait(*ab.post(first)));
  REQUIRE(ab.wait(*ab.post(second)));
  auto none = ba.wait_notice(clock::now() + 300ms);
  REQUIRE_FALSE(none);
  CHECK(none.error().code() == errc::timeout);
  REQUIRE(ab.wait(*ab.post(last)));
  auto n = ba.wait_notice(clock::now() + 5s);
  REQUIRE_MESSAGE(n, n.error().to_string());
  CHECK(n->lease_id == 7);
  CHECK_FALSE(n->cancelled);
  CHECK(dst == src);
  CHECK_FALSE(ba.wait_notice(clock::now() + 100ms)); // one notice for the three
  CHECK(a.deregister(*s));
  CHECK(b.deregister(*d));
}

} // namespace troupe::cluster::transfer::test
