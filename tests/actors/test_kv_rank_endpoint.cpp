// A prefill rank's kv_rank_endpoint pushes an armed request's KV layer by layer while the step
// that completes its prompt runs: a decode rank's endpoint (socket transport on loopback) holds
// each layer as soon as the backend reports it written and before the next is, and hears of the
// push once, after its last layer. A failed step, a cancel before the step and chunks before the
// prompt's last are checked too. The backend is played by the test (kv_layer_listener calls).
#include <doctest/doctest.h>

#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/serving/kv_rank_endpoint.hpp"

using namespace troupe;
using namespace std::chrono_literals;

namespace {

constexpr int32_t layers = 4, heads = 2, dim = 4, block = 4, blocks = 8;

// One rank's cache in host memory, K and V in separate allocations (as the CPU backend's).
struct rank_cache {
  std::vector<float> k, v;
  engine::kv_layout layout;
  rank_cache() : k(static_cast<size_t>(layers) * blocks * block * heads * dim, -1.0f), v(k) {
    layout = {.dtype = "float32",
              .elem_bytes = 4,
              .num_layers = layers,
              .layer_begin = 0,
              .layer_end = layers,
              .num_kv_heads = heads,
              .head_begin = 0,
              .head_end = heads,
              .head_dim = dim,
              .block_size = block,
              .num_blocks = blocks};
    layout.allocations = {{k.data(), k.size() * 4, false}, {v.data(), v.size() * 4, false}};
    const uint64_t plane = static_cast<uint64_t>(blocks) * block * heads * dim * 4;
    for (int32_t l = 0; l < layers; ++l)
      for (uint32_t kv = 0; kv < 2; ++kv)
        layout.planes.push_back({kv, l * plane});
  }
  float& at(int32_t layer, int kv, int32_t blk, int32_t t, int32_t h, int32_t e) {
    const auto& p = layout.plane_of(layer, kv);
    return (kv == 0 ? k : v)[(p.offset + layout.at(blk, t, h)) / 4 + static_cast<size_t>(e)];
  }
};

float truth(int32_t layer, int kv, int32_t pos, int32_t h, int32_t e) {
  return static_cast<float>((((layer * 2 + kv) * 100 + pos) * heads + h) * dim + e);
}

const std::vector<int32_t> prefill_table{1, 2, 3}, decode_table{5, 6, 7};
constexpr int32_t prompt = 10;

// How many of layer `layer`'s prompt values reached the decode cache.
int64_t landed(rank_cache& d, int32_t layer) {
  int64_t n = 0;
  for (int kv = 0; kv < 2; ++kv)
    for (int32_t pos = 0; pos < prompt; ++pos)
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t e = 0; e < dim; ++e)
          n += d.at(layer, kv, decode_table[pos / block], pos % block, h, e) ==
               truth(layer, kv, pos, h, e);
  return n;
}
constexpr int64_t per_layer = 2LL * prompt * heads * dim;

struct endpoints {
  rank_cache p, d;
  std::unique_ptr<serve::kv_rank_endpoint> prefill, decode;
  endpoints() {
    for (int32_t l = 0; l < layers; ++l)
      for (int kv = 0; kv < 2; ++kv)
        for (int32_t pos = 0; pos < prompt; ++pos)
          for (int32_t h = 0; h < heads; ++h)
            for (int32_t e = 0; e < dim; ++e)
              p.at(l, kv, prefill_table[pos / block], pos % block, h, e) = truth(l, kv, pos, h, e);
    auto dec = serve::kv_rank_endpoint::open(
        {.role = "decode", .provider = "socket", .host = "127.0.0.1"}, d.layout, 0);
    REQUIRE_MESSAGE(dec.has_value(), (dec ? "" : dec.error().to_string()));
    auto pre = serve::kv_rank_endpoint::open(
        {.role = "prefill", .provider = "socket", .host = "127.0.0.1"}, p.layout, 0);
    REQUIRE_MESSAGE(pre.has_value(), (pre ? "" : pre.error().to_string()));
    decode = std::move(*dec);
    prefill = std::move(*pre);
    auto linked = prefill->link(
        {.decode = 0, .prefill = {prefill->describe()}, .ranks = {decode->describe()}});
    REQUIRE_MESSAGE(linked.has_value(), (linked ? "" : linked.error().to_string()));
  }
  msg::kv_push push(uint64_t lease, uint64_t seq) const {
    return {.lease = lease,
            .decode = 0,
            .seq = seq,
            .decode_blocks = decode_table,
            .begin = 0,
            .end = prompt,
            .timeout_ms = 10000};
  }
};

step_plan step(uint64_t n, uint64_t seq, int32_t start, int32_t tokens) {
  step_plan plan{.step = n, .seqs = {}, .finished = {}};
  auto& s = plan.seqs.emplace_back();
  s.id = seq;
  s.start_pos = start;
  s.tokens.assign(static_cast<size_t>(tokens), 1);
  s.block_table = prefill_table;
  auto& other = plan.seqs.emplace_back(); // not armed: ignored
  other.id = seq + 1;
  other.tokens = {1};
  other.block_table = {0};
  return plan;
}

bool eventually(const std::function<bool()>& f) {
  for (auto until = std::chrono::steady_clock::now() + 5s; std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(5ms))
    if (f())
      return true;
  return f();
}

expected<void> written_now() {
  return {};
}

} // namespace

TEST_CASE("kv rank endpoint: an armed push goes out layer by layer as the step writes them") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  endpoints e;
  e.decode->notify(caf::actor_cast<caf::actor>(self));
  e.prefill->push(e.push(7, 42), caf::actor_cast<caf::actor>(self));

  // A chunk before the prompt's last: nothing to hear of.
  CHECK_FALSE(e.prefill->pusher()->step_begins(step(1, 42, 0, 4)));
  e.prefill->pusher()->step_ends(true);
  // The prompt's last chunk: the push starts with its first layer, before the others exist.
  REQUIRE(e.prefill->pusher()->step_begins(step(2, 42, 4, prompt - 4)));
  for (int32_t l = 0; l < layers; ++l) {
    e.prefill->pusher()->layer_written(l, written_now);
    CHECK(eventually([&] { return landed(e.d, l) == per_layer; }));
    if (l + 1 == layers)
      break;
    CHECK(landed(e.d, l + 1) == 0);
    bool early = false; // no notice, no answer before the last layer
    self->receive([&](msg::landed_atom, uint64_t, bool) { early = true; },
                  [&](msg::kv_pushed_atom, const msg::kv_pushed&) { early = true; },
                  caf::after(50ms) >> [] {});
    CHECK_FALSE(early);
  }
  e.prefill->pusher()->step_ends(true);
  int notices = 0;
  std::optional<msg::kv_pushed> answer;
  for (int i = 0; i < 2; ++i)
    self->receive(
        [&](msg::landed_atom, uint64_t lease, bool cancelled) {
          CHECK(lease == 7);
          CHECK_FALSE(cancelled);
          ++notices;
        },
        [&](msg::kv_pushed_atom, const msg::kv_pushed& r) { answer = r; },
        caf::after(5s) >> [] { FAIL("no answer"); });
  CHECK(notices == 1);
  REQUIRE(answer);
  CHECK(answer->lease == 7);
  CHECK(answer->error.empty());
  CHECK(answer->bytes == static_cast<uint64_t>(per_layer * layers * 4));
  // Only the prompt's positions in the reserved blocks were written.
  int64_t touched = 0;
  for (float x : e.d.k)
    touched += x != -1.0f;
  for (float x : e.d.v)
    touched += x != -1.0f;
  CHECK(touched == per_layer * layers);
}

TEST_CASE("kv rank endpoint: a failed step, a cancel and a layer that never comes end a push") {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  endpoints e;
  e.decode->notify(caf::actor_cast<caf::actor>(self));
  auto answer = [&] {
    std::optional<msg::kv_pushed> r;
    self->receive([&](msg::kv_pushed_atom, const msg::kv_pushed& p) { r = p; },
                  caf::after(5s) >> [] { FAIL("no answer"); });
    return r.value_or(msg::kv_pushed{});
  };
  SUBCASE("the step fails after its first layer") {
    e.prefill->push(e.push(1, 10), caf::actor_cast<caf::actor>(self));
    REQUIRE(e.prefill->pusher()->step_begins(step(1, 10, 0, prompt)));
    e.prefill->pusher()->layer_written(0, written_now);
    e.prefill->pusher()->step_ends(false);
    auto r = answer();
    CHECK(r.lease == 1);
    CHECK(r.error.find("prefill step failed") != std::string::npos);
  }
  SUBCASE("cancelled before its step") {
    e.prefill->push(e.push(2, 20), caf::actor_cast<caf::actor>(self));
    e.prefill->cancel(2);
    auto r = answer();
    CHECK(r.lease == 2);
    CHECK(r.cancelled);
    CHECK_FALSE(e.prefill->pusher()->step_begins(step(1, 20, 0, prompt))); // disarmed
    e.prefill->pusher()->step_ends(true);
  }
  SUBCASE("the backend reports a layer it could not wait for") {
    e.prefill->push(e.push(3, 30), caf::actor_cast<caf::actor>(self));
    REQUIRE(e.prefill->pusher()->step_begins(step(1, 30, 0, prompt)));
    e.prefill->pusher()->layer_written(
        0, [] { return expected<void>(make_error(errc::internal, "boom")); });
    auto r = answer();
    CHECK(r.error.find("boom") != std::string::npos);
    e.prefill->pusher()->step_ends(true);
  }
  bool noticed = false; // a push that failed notifies nobody: its parts were silent
  self->receive([&](msg::landed_atom, uint64_t, bool) { noticed = true; },
                caf::after(100ms) >> [] {});
  CHECK_FALSE(noticed);
}
