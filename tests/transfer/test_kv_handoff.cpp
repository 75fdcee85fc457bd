// The layout contract between prefill and decode ranks (kv_handoff_plan): for tensor splits,
// pipeline splits and block sizes that differ between the groups, the planned writes, executed
// through the local transport, put every prompt position's K and V of every layer and head where
// the decode ranks' layouts say, touch nothing else, and refuse groups that do not agree.
#include <algorithm>
#include <map>
#include <numeric>
#include <optional>

#include <doctest/doctest.h>

#include "cluster/transfer/kv_handoff.hpp"
#include "cluster/transfer/local_transport.hpp"
#include "cluster/transfer/staging.hpp"

using namespace troupe;
using namespace troupe::cluster::transfer;
using engine::kv_layout;

namespace {

constexpr int32_t layers = 4, heads = 4, dim = 3;

// One rank of a tensor x pipeline grid with its own host memory (K and V in separate
// allocations, as the CPU backend keeps them).
struct rank_memory {
  kv_layout layout;
  std::vector<std::vector<float>> bytes; // one per allocation
};

rank_memory make_rank(int32_t tp, int32_t tp_rank, int32_t pp, int32_t pp_rank, int32_t block_size,
                      int32_t num_blocks) {
  rank_memory r;
  auto& k = r.layout;
  const int32_t per_stage = layers / pp, per_rank = std::max(1, heads / tp);
  k = {.dtype = "float32",
       .elem_bytes = 4,
       .num_layers = layers,
       .layer_begin = pp_rank * per_stage,
       .layer_end = (pp_rank + 1) * per_stage,
       .num_kv_heads = heads,
       // tp > heads: each rank holds one head, replicated (as shard_plan does)
       .head_begin = tp > heads ? tp_rank * heads / tp : tp_rank * per_rank,
       .head_end = (tp > heads ? tp_rank * heads / tp : tp_rank * per_rank) + per_rank,
       .head_dim = dim,
       .block_size = block_size,
       .num_blocks = num_blocks};
  const size_t plane = static_cast<size_t>(num_blocks) * block_size * per_rank * dim;
  for (int kv = 0; kv < 2; ++kv) {
    r.bytes.emplace_back(plane * per_stage, -1.0f);
    k.allocations.push_back({r.bytes.back().data(), r.bytes.back().size() * 4, false});
  }
  for (int32_t l = 0; l < per_stage; ++l)
    for (int kv = 0; kv < 2; ++kv)
      k.planes.push_back({static_cast<uint32_t>(kv), l * plane * 4});
  return r;
}

// The value position `pos` of layer/kv/head/element holds in every rank's cache.
float truth(int32_t layer, int kv, int32_t pos, int32_t head, int32_t e) {
  return static_cast<float>((((layer * 2 + kv) * 1000 + pos) * heads + head) * dim + e);
}

float& at(rank_memory& r, int32_t layer, int kv, int32_t block, int32_t t, int32_t head,
          int32_t e) {
  const auto& k = r.layout;
  const auto& p = k.plane_of(layer, kv);
  const uint64_t off = p.offset + k.at(block, t, head - k.head_begin) + e * 4;
  return r.bytes[p.allocation][off / 4];
}

struct group {
  int32_t tp, pp, block_size;
};

// Runs one request's handoff between two groups through the local transport and checks every
// decode rank's cache. `staged`: as over a transport that cannot reach the KV memory, the
// prefill side writes from a staging buffer into the decode ranks' landing areas, which are
// then copied into their caches (cluster/transfer/staging.hpp). `layered`: each batch is posted
// a layer at a time as one parted_transfer (as a prefill rank does while its step runs).
void check_handoff(group pg, group dg, int32_t prompt, int32_t cached, bool staged = false,
                   bool layered = false) {
  CAPTURE(staged);
  CAPTURE(layered);
  CAPTURE(pg.tp);
  CAPTURE(pg.pp);
  CAPTURE(pg.block_size);
  CAPTURE(dg.tp);
  CAPTURE(dg.pp);
  CAPTURE(dg.block_size);
  CAPTURE(cached);
  constexpr int32_t blocks = 64; // enough for every table below without reusing a block
  std::vector<rank_memory> P, D;
  for (int32_t s = 0; s < pg.pp; ++s)
    for (int32_t t = 0; t < pg.tp; ++t)
      P.push_back(make_rank(pg.tp, t, pg.pp, s, pg.block_size, blocks));
  for (int32_t s = 0; s < dg.pp; ++s)
    for (int32_t t = 0; t < dg.tp; ++t)
      D.push_back(make_rank(dg.tp, t, dg.pp, s, dg.block_size, blocks));
  // Scattered block tables: P uses blocks from the end, D every other one.
  std::vector<int32_t> pb, db;
  for (int32_t i = 0; i < (prompt + pg.block_size - 1) / pg.block_size; ++i)
    pb.push_back(blocks - 1 - i);
  for (int32_t i = 0; i < (prompt + dg.block_size - 1) / dg.block_size; ++i)
    db.push_back((2 * i + 1) % blocks);
  for (auto& r : P)
    for (int32_t l = r.layout.layer_begin; l < r.layout.layer_end; ++l)
      for (int kv = 0; kv < 2; ++kv)
        for (int32_t pos = 0; pos < prompt; ++pos)
          for (int32_t h = r.layout.head_begin; h < r.layout.head_end; ++h)
            for (int32_t e = 0; e < dim; ++e)
              at(r, l, kv, pb[pos / pg.block_size], pos % pg.block_size, h, e) =
                  truth(l, kv, pos, h, e);
  std::vector<kv_layout> pl, dl;
  for (auto& r : P)
    pl.push_back(r.layout);
  // Staged: the decode ranks publish landing areas, their blocks handed out from the end; the
  // entries before the first block sent are never read.
  constexpr int32_t landing_blocks = 40;
  std::vector<staging_buffer> landing;
  std::vector<int32_t> lb;
  for (int32_t i = 0; i < (prompt + dg.block_size - 1) / dg.block_size; ++i)
    lb.push_back(i < cached / dg.block_size ? -1 : landing_blocks - 1 - i);
  for (auto& r : D) {
    if (!staged) {
      dl.push_back(r.layout);
      continue;
    }
    dl.push_back(landing_layout(r.layout, landing_blocks));
    landing.push_back(*staging_buffer::allocate(dl.back().allocations[0].bytes, false));
    dl.back().allocations[0].base = landing.back().data();
  }
  auto plan = kv_handoff_plan::make(pl, dl);
  REQUIRE_MESSAGE(plan.has_value(), (plan ? "" : plan.error().to_string()));
  // Every decode rank is fed by the pairs that name it; each P rank's heads are sent once.
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < plan->pairs().size(); ++i) {
    auto [p, d] = plan->pairs()[i];
    auto pt = std::make_shared<local_transport>(), dt = std::make_shared<local_transport>();
    write_batch batch{.lease_id = i + 1};
    for (const auto& a : P[p].layout.allocations)
      batch.locals.push_back(*pt->register_memory(a.base, a.bytes, memory_kind::host));
    for (const auto& a : dl[d].allocations)
      batch.remotes.push_back(
          *dt->describe(*dt->register_memory(a.base, a.bytes, memory_kind::host)));
    REQUIRE(plan->ranges(i, pb, staged ? lb : db, cached, prompt, batch.ranges).has_value());
    auto [out, in] = local_transport::connect_pair(pt, dt);
    std::optional<staging_buffer> out_buffer;
    std::optional<stage_area> area;
    if (staged) { // a staging buffer, used at an offset into it
      uint64_t bytes = 0;
      for (const auto& r : batch.ranges)
        bytes += r.length;
      out_buffer = *staging_buffer::allocate(bytes + 100, false);
      area = stage_area{
          .at = out_buffer->data() + 100,
          .staged = *pt->register_memory(out_buffer->data(), out_buffer->size(), memory_kind::host),
          .offset = 100,
          .sources = P[p].layout.allocations,
          .device = false};
    }
    transfer_id id = 0;
    if (layered) { // the layers in turn, the last with any range notifying, chunks of ~200 bytes
      std::vector<std::vector<write_range>> by_layer;
      int32_t last = 0;
      for (int32_t l = 0; l < layers; ++l) {
        REQUIRE(plan->ranges(i, pb, staged ? lb : db, cached, prompt, by_layer.emplace_back(), l)
                    .has_value());
        if (!by_layer.back().empty())
          last = l;
      }
      size_t split = 0;
      for (const auto& r : by_layer)
        split += r.size();
      CHECK(split == batch.ranges.size()); // the layers' ranges are the batch's
      parted_transfer t(*out, batch, 200, area);
      for (int32_t l = 0; l <= last; ++l)
        REQUIRE(
            t.post(by_layer[static_cast<size_t>(l)], l == last, [] { return false; }).has_value());
      total_bytes += t.result().silent.bytes;
      id = t.result().last;
    } else if (staged) { // in chunks of ~200 bytes
      auto posted = post_staged(*out, batch, *area, 200, [] { return false; });
      REQUIRE_MESSAGE(posted.has_value(), (posted ? "" : posted.error().to_string()));
      total_bytes += posted->silent.bytes;
      id = posted->last;
    } else {
      auto posted = out->post(std::move(batch));
      REQUIRE_MESSAGE(posted.has_value(), (posted ? "" : posted.error().to_string()));
      id = *posted;
    }
    auto done = out->wait(id);
    REQUIRE(done.has_value());
    total_bytes += done->bytes;
    auto notice = in->wait_notice(clock::now() + std::chrono::seconds(5));
    REQUIRE(notice.has_value());
    CHECK(notice->lease_id == i + 1);
    CHECK_FALSE(in->wait_notice(clock::now())); // one notice per batch, chunked or not
  }
  for (size_t d = 0; staged && d < D.size(); ++d) { // the landing areas into the caches
    std::vector<engine::copy_span> copies;
    REQUIRE(unstage_copies(dl[d], landing[d].data(), D[d].layout, lb, db, cached, prompt, copies)
                .has_value());
    REQUIRE(copy_all(copies, false).has_value());
  }
  const uint64_t replicas = dg.tp > heads ? static_cast<uint64_t>(dg.tp / heads) : 1;
  CHECK(total_bytes == plan->bytes_per_token() * static_cast<uint64_t>(prompt - cached) * replicas);
  int64_t wrong = 0, untouched_wrong = 0;
  for (auto& r : D)
    for (int32_t l = r.layout.layer_begin; l < r.layout.layer_end; ++l)
      for (int kv = 0; kv < 2; ++kv)
        for (int32_t pos = 0; pos < prompt; ++pos)
          for (int32_t h = r.layout.head_begin; h < r.layout.head_end; ++h)
            for (int32_t e = 0; e < dim; ++e) {
              const float got = at(r, l, kv, db[pos / dg.block_size], pos % dg.block_size, h, e);
              if (pos < cached)
                untouched_wrong += got != -1.0f; // the decode side's cache: not sent
              else
                wrong += got != truth(l, kv, pos, h, e);
            }
  CHECK(wrong == 0);
  CHECK(untouched_wrong == 0);
  // Nothing outside the reserved blocks was written.
  int64_t stray = 0;
  for (auto& r : D)
    for (const auto& a : r.bytes) {
      const auto written = std::count_if(a.begin(), a.end(), [](float v) { return v != -1.0f; });
      stray += written;
    }
  const int64_t expected = static_cast<int64_t>(prompt - cached) * layers * 2 * heads * dim *
                           (dg.tp > heads ? dg.tp / heads : 1);
  CHECK(stray == expected);
}

} // namespace

TEST_CASE("kv handoff: equal layouts, whole blocks in one write each") {
  check_handoff({1, 1, 4}, {1, 1, 4}, 23, 0);
  check_handoff({1, 1, 4}, {1, 1, 4}, 23, 8);
}

TEST_CASE("kv handoff: block sizes differ between the groups") {
  check_handoff({1, 1, 4}, {1, 1, 16}, 37, 0);
  check_handoff({1, 1, 16}, {1, 1, 4}, 37, 12);
  check_handoff({1, 1, 3}, {1, 1, 5}, 29, 10);
}

TEST_CASE("kv handoff: tensor sizes differ (prefill tp2 to decode tp1 and tp1 to tp2)") {
  check_handoff({2, 1, 4}, {1, 1, 4}, 19, 0);
  check_handoff({1, 1, 4}, {2, 1, 4}, 19, 4);
  check_handoff({4, 1, 8}, {2, 1, 4}, 19, 0);
  check_handoff({8, 1, 4}, {1, 1, 4}, 9, 0); // replicated heads on the prefill side: sent once
  check_handoff({1, 1, 4}, {8, 1, 4}, 9, 0); // and to every replica on the decode side
}

TEST_CASE("kv handoff: pipeline sizes differ, with tensor and block size") {
  check_handoff({1, 2, 4}, {1, 1, 8}, 21, 0);
  check_handoff({2, 2, 4}, {1, 4, 2}, 21, 6);
  check_handoff({1, 4, 16}, {2, 2, 4}, 40, 16);
}

TEST_CASE("kv handoff: staged through host buffers and landing areas, every layout") {
  check_handoff({1, 1, 4}, {1, 1, 4}, 23, 0, true);
  check_handoff({1, 1, 4}, {1, 1, 4}, 23, 9, true);
  check_handoff({1, 1, 3}, {1, 1, 5}, 29, 10, true);
  check_handoff({2, 1, 4}, {1, 1, 8}, 19, 0, true);
  check_handoff({1, 1, 4}, {2, 1, 4}, 19, 4, true);
  check_handoff({1, 1, 4}, {8, 1, 4}, 9, 0, true);
  check_handoff({2, 2, 4}, {1, 4, 2}, 21, 6, true);
}

TEST_CASE("kv handoff: layer by layer, staged or not, every layout") {
  for (bool staged : {false, true}) {
    check_handoff({1, 1, 4}, {1, 1, 4}, 23, 0, staged, true);
    check_handoff({1, 1, 3}, {1, 1, 5}, 29, 10, staged, true);
    check_handoff({2, 1, 4}, {1, 1, 8}, 19, 0, staged, true);
    check_handoff({1, 1, 4}, {8, 1, 4}, 9, 0, staged, true);
    check_handoff({2, 2, 4}, {1, 4, 2}, 21, 6, staged, true);
  }
}

TEST_CASE("staging ring: hands out in order, reuses what every older range gave back") {
  staging_ring ring(100);
  CHECK(!ring.allocate(0));
  CHECK(!ring.allocate(101));
  auto a = ring.allocate(40), b = ring.allocate(40);
  REQUIRE((a && b));
  CHECK(*a == 0);
  CHECK(*b == 40);
  CHECK(!ring.allocate(30)); // 20 left at the end, nothing before
  ring.release(*b);          // out of order: a still holds the start
  CHECK(!ring.allocate(30));
  ring.release(*a);
  CHECK(ring.empty());
  auto c = ring.allocate(70), d = ring.allocate(30);
  REQUIRE((c && d));
  CHECK(*c == 0);
  CHECK(*d == 70);
  ring.release(*c);
  auto e = ring.allocate(60); // wraps in front of d
  REQUIRE(e);
  CHECK(*e == 0);
  CHECK(!ring.allocate(20)); // between e's end (60) and d (70): only 10
  auto f = ring.allocate(10);
  REQUIRE(f);
  CHECK(*f == 60);
  ring.release(*d);
  ring.release(*e);
  ring.release(*f);
  CHECK(ring.empty());
}

TEST_CASE("staging: copies that continue each other merge") {
  std::vector<char> src(64), dst(64);
  std::vector<engine::copy_span> copies;
  add_copy(copies, dst.data(), src.data(), 8);
  add_copy(copies, dst.data() + 8, src.data() + 8, 8);   // continues both sides
  add_copy(copies, dst.data() + 16, src.data() + 32, 8); // source jumps
  add_copy(copies, dst.data() + 24, src.data() + 40, 0); // empty: dropped
  REQUIRE(copies.size() == 2);
  CHECK(copies[0].bytes == 16);
  CHECK(copies[1].src == src.data() + 32);
}

TEST_CASE("kv handoff: whole-block runs coalesce into few writes") {
  auto p = make_rank(1, 0, 1, 0, 16, 8), d = make_rank(1, 0, 1, 0, 16, 8);
  auto plan = kv_handoff_plan::make({p.layout}, {d.layout});
  REQUIRE(plan.has_value());
  std::vector<write_range> ranges;
  const std::vector<int32_t> blocks = {0, 1, 2, 3};
  REQUIRE(plan->ranges(0, blocks, blocks, 0, 64, ranges).has_value());
  CHECK(ranges.size() == static_cast<size_t>(layers * 2 * 4)); // one per block, layer and K/V
  for (const auto& r : ranges)
    CHECK(r.length == 16 * p.layout.token_bytes());
}

TEST_CASE("kv handoff: groups that do not agree are refused with the reason") {
  auto p = make_rank(1, 0, 1, 0, 4, 8);
  auto d = make_rank(1, 0, 1, 0, 4, 8);
  d.layout.dtype = "bfloat16";
  auto r = kv_handoff_plan::make({p.layout}, {d.layout});
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message().find("same device and dtype") != std::string::npos);
  d = make_rank(1, 0, 1, 0, 4, 8);
  d.layout.num_layers = 5;
  d.layout.layer_end = 5;
  r = kv_handoff_plan::make({p.layout}, {d.layout});
  REQUIRE_FALSE(r.has_value());
  // A decode rank's layer no prefill rank holds.
  auto half = make_rank(1, 0, 2, 0, 4, 8); // layers 0-1 only
  r = kv_handoff_plan::make({half.layout}, {make_rank(1, 0, 1, 0, 4, 8).layout});
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message().find("no prefill rank holds layer 2") != std::string::npos);
  // Block tables too short for the positions.
  auto ok = kv_handoff_plan::make({p.layout}, {make_rank(1, 0, 1, 0, 4, 8).layout});
  REQUIRE(ok.has_value());
  std::vector<write_range> out;
  const std::vector<int32_t> two = {0, 1};
  CHECK(ok->ranges(0, two, two, 0, 9, out).error().code() == errc::out_of_range);
  const std::vector<int32_t> bad = {0, 1, 99};
  CHECK(ok->ranges(0, bad, bad, 0, 9, out).error().code() == errc::out_of_range);
}
