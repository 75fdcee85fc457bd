// The KV block pool: reference counts, all-or-nothing allocation, prefix cache lookups that
// verify tokens and parents, LRU eviction order, and an invariant checker that catches misuse.
#include <doctest/doctest.h>

#include "engine/kv/block_pool.hpp"

using namespace troupe;
using namespace troupe::engine::kv;

namespace {
std::vector<token_id> toks(token_id a) {
  return {a, a + 1, a + 2, a + 3};
}
} // namespace

TEST_CASE("block_pool: allocate is all or nothing, release returns blocks") {
  block_pool pool(4, 4, false);
  std::vector<int32_t> a, b;
  REQUIRE(pool.allocate(3, a));
  CHECK(a.size() == 3);
  CHECK(pool.num_free() == 1);
  CHECK_FALSE(pool.allocate(2, b));
  CHECK(b.empty());
  CHECK(pool.num_free() == 1);
  CHECK(pool.usage() == doctest::Approx(0.75));
  pool.release_all(a);
  CHECK(a.empty());
  CHECK(pool.num_free() == 4);
  CHECK(pool.check().has_value());
}

TEST_CASE("block_pool: the checker catches a double free and a leak") {
  block_pool pool(2, 4, false);
  std::vector<int32_t> a;
  REQUIRE(pool.allocate(1, a));
  pool.release(a[0]);
  pool.release(a[0]); // freed twice
  auto r = pool.check();
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code() == errc::internal);
}

TEST_CASE("block_pool: a cached block is found by hash, tokens and parent, then shared") {
  block_pool pool(4, 4, true);
  std::vector<int32_t> a;
  REQUIRE(pool.allocate(2, a));
  const auto h0 = hash_block(0, toks(10));
  const auto h1 = hash_block(h0, toks(20));
  pool.cache(a[0], h0, toks(10), -1);
  pool.cache(a[1], h1, toks(20), a[0]);
  CHECK(pool.num_cached() == 2);

  CHECK(pool.lookup(h0, toks(10), -1) == a[0]);
  CHECK(pool.lookup(h1, toks(20), a[0]) == a[1]);
  CHECK(pool.lookup(h0, toks(11), -1) == -1);   // same hash, other tokens: never aliased
  CHECK(pool.lookup(h1, toks(20), a[1]) == -1); // other parent
  CHECK(pool.stats().lookups == 4);
  CHECK(pool.stats().hits == 2);

  const int32_t b0 = a[0], b1 = a[1];
  pool.acquire(b0);
  CHECK(pool.ref_count(b0) == 2);
  pool.release_all(a); // b1 then b0: b1 becomes evictable, b0 still held once
  CHECK(pool.ref_count(b0) == 1);
  CHECK(pool.num_free() == 3);
  CHECK(pool.check().has_value());
  CHECK(pool.lookup(h1, toks(20), b0) == b1); // free but cached: still found
}

TEST_CASE("block_pool: uncached blocks go first, then the least recently released cached one") {
  block_pool pool(3, 4, true);
  std::vector<int32_t> a;
  REQUIRE(pool.allocate(3, a));
  const auto hx = hash_block(0, toks(1)), hy = hash_block(0, toks(5));
  pool.cache(a[0], hx, toks(1), -1);
  pool.cache(a[1], hy, toks(5), -1);
  pool.release(a[1]); // y released first: least recent
  pool.release(a[0]);
  pool.release(a[2]); // uncached
  std::vector<int32_t> b;
  REQUIRE(pool.allocate(1, b));
  CHECK(b[0] == a[2]);
  CHECK(pool.stats().evictions == 0);
  REQUIRE(pool.allocate(1, b));
  CHECK(b[1] == a[1]); // y evicted
  CHECK(pool.stats().evictions == 1);
  CHECK(pool.lookup(hy, toks(5), -1) == -1);
  CHECK(pool.lookup(hx, toks(1), -1) == a[0]);
  CHECK(pool.check().has_value());
}

TEST_CASE("block_pool: a child whose parent block was evicted and reused is not trusted") {
  block_pool pool(2, 4, true);
  std::vector<int32_t> a;
  REQUIRE(pool.allocate(2, a));
  const auto h0 = hash_block(0, toks(1)), h1 = hash_block(h0, toks(9));
  pool.cache(a[0], h0, toks(1), -1);
  pool.cache(a[1], h1, toks(9), a[0]);
  pool.release(a[0]); // parent evictable first
  pool.release(a[1]);
  std::vector<int32_t> b;
  REQUIRE(pool.allocate(1, b)); // evicts the parent, hands it out again
  CHECK(b[0] == a[0]);
  CHECK(pool.lookup(h1, toks(9), a[0]) == -1); // same block id, new generation
}

TEST_CASE("block_pool: with prefix caching off nothing is cached or found") {
  block_pool pool(2, 4, false);
  std::vector<int32_t> a;
  REQUIRE(pool.allocate(1, a));
  const auto h = hash_block(0, toks(1));
  pool.cache(a[0], h, toks(1), -1);
  CHECK(pool.num_cached() == 0);
  CHECK(pool.lookup(h, toks(1), -1) == -1);
  CHECK(hash_block(0, toks(1)) != hash_block(0, toks(2)));
  CHECK(hash_block(1, toks(1)) != hash_block(2, toks(1)));
}
