// Load progress (engine/model/load_progress.hpp): the reports' rate limit, order and end, and on
// the golden models that the bytes a CPU rank counts while loading end at exactly the total it
// announced first, which is the bytes of its own shard: every tensor once at tensor=1, about
// half each at tensor=2 (Gloo ranks on threads), each stage its layers at pipeline=2.
#include <atomic>
#include <mutex>
#include <thread>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/model/load_progress.hpp"
#include "engine/model/safetensors.hpp"
#include "golden.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// Every report of one load, checked as it comes: never two at once, bytes never decreasing,
// nothing after the last.
struct recorder {
  std::mutex mu;
  std::vector<load_report> reports;
  std::atomic<int> inside{0};
  bool overlapped = false, after_done = false;
  load_callback callback() {
    return [this](const load_report& r) {
      if (inside.fetch_add(1) != 0)
        overlapped = true;
      {
        std::lock_guard lk(mu);
        if (!reports.empty() && reports.back().done)
          after_done = true;
        reports.push_back(r);
      }
      inside.fetch_sub(1);
    };
  }
  void check_monotonic_and_final(uint64_t total) {
    REQUIRE(reports.size() >= 2);
    CHECK_FALSE(overlapped);
    CHECK_FALSE(after_done);
    CHECK(reports.front().bytes == 0); // the total is announced before the first read
    for (size_t i = 0; i < reports.size(); ++i) {
      CAPTURE(i);
      CHECK(reports[i].total == total);
      CHECK(reports[i].done == (i + 1 == reports.size()));
      if (i > 0) {
        CHECK(reports[i].bytes >= reports[i - 1].bytes);
        CHECK(reports[i].elapsed_s >= reports[i - 1].elapsed_s);
      }
    }
    CHECK(reports.back().bytes == total);
  }
};

// Every tensor's stored bytes in a model folder's safetensors files.
uint64_t checkpoint_bytes(const fs::path& dir) {
  uint64_t sum = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") {
      auto f = safetensors_file::open(e.path());
      REQUIRE(f.has_value());
      for (const auto& t : f->tensors())
        sum += t.end - t.begin;
    }
  return sum;
}

kv_cache_options small_kv() {
  return {.num_blocks = 4, .block_size = 16};
}

} // namespace

TEST_CASE(
    "load_progress: at most one report per interval and monotonic with the last one at the total") {
  recorder rec;
  constexpr uint64_t total = 3'000'000;
  const auto t0 = std::chrono::steady_clock::now();
  {
    load_progress p(total, rec.callback(), 20ms);
    // Four threads add 3 M bytes a few at a time for at least 150 ms.
    std::vector<std::thread> readers;
    for (int t = 0; t < 4; ++t)
      readers.emplace_back([&] {
        for (int i = 0; i < 250'000; ++i) {
          p.add(3);
          if (i % 5000 == 0)
            std::this_thread::sleep_for(3ms);
        }
      });
    for (auto& r : readers)
      r.join();
    CHECK(p.bytes() == total);
    p.finish();
    p.finish(); // once
    p.add(10);  // nothing after the end
    CHECK(p.reports() == static_cast<int>(rec.reports.size()));
  }
  const double elapsed_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  rec.check_monotonic_and_final(total);
  MESSAGE(rec.reports.size(), " reports in ", elapsed_ms, " ms");
  // The first (0), one per 20 ms at most, the last: a million adds make a few dozen reports.
  CHECK(rec.reports.size() <= static_cast<size_t>(elapsed_ms / 20) + 2);
  CHECK(rec.reports.size() >= 3); // it did report while reading
}

TEST_CASE("load_progress: counted_weights counts each slice's stored bytes") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto store = weight_store::open(*dir);
  REQUIRE(store.has_value());
  auto t = store->lookup("model.layers.0.mlp.down_proj.weight");
  REQUIRE(t.has_value());
  const auto shape = t->second->shape; // [hidden, intermediate]
  const uint64_t es = dtype_size(t->second->type);
  recorder rec;
  load_progress p(0, rec.callback(), 0ms);
  counted_weights w(*store, p);
  REQUIRE(w.load_f32_cols("model.layers.0.mlp.down_proj.weight", shape, 0, shape[1] / 2));
  CHECK(p.bytes() == static_cast<uint64_t>(shape[0] * (shape[1] / 2)) * es);
  REQUIRE(w.load_f32_rows("model.layers.0.mlp.down_proj.weight", shape, 1, 3));
  CHECK(p.bytes() == static_cast<uint64_t>(shape[0] * (shape[1] / 2) + 2 * shape[1]) * es);
  CHECK_FALSE(w.load_f32("no.such.tensor", {1}));
  CHECK(p.bytes() == static_cast<uint64_t>(shape[0] * (shape[1] / 2) + 2 * shape[1]) * es);
  CHECK(w.store() == &*store); // the CUDA loader's direct path still sees the store
}

TEST_CASE("load_progress: a CPU rank of one reads every tensor once and ends at the total") {
  for (const char* name : {"tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-qwen3-moe"}) {
    CAPTURE(name);
    auto dir = test::golden_model(name);
    if (!dir)
      return;
    recorder rec;
    auto b = cpu_backend::load(*dir, small_kv(), {}, rec.callback());
    REQUIRE_MESSAGE(b.has_value(), (b ? "" : b.error().to_string()));
    rec.check_monotonic_and_final(checkpoint_bytes(*dir));
  }
}

TEST_CASE("load_progress: tensor=2 ranks each read about half and pipeline=2 stages their layers") {
  for (auto [tp, pp] : {std::pair{2, 1}, std::pair{1, 2}}) {
    for (const char* name : {"tiny-qwen3", "tiny-qwen3-moe"}) {
      CAPTURE(name);
      CAPTURE(tp);
      auto dir = test::golden_model(name);
      if (!dir)
        return;
      const uint64_t whole = checkpoint_bytes(*dir);
      test::temp_dir store_dir;
      recorder rec[2];
      std::string errors[2];
      std::vector<std::thread> ranks;
      for (int r = 0; r < 2; ++r)
        ranks.emplace_back([&, r] {
          auto store = comm::make_folder_store(store_dir.path().string());
          auto c = comm::make_gloo_communicator(*store, r, 2, {.prefix = "g", .timeout = 20s});
          if (!c) {
            errors[r] = c.error().to_string();
            return;
          }
          parallel_context par{.layout = {.tp_rank = tp == 2 ? r : 0,
                                          .tp_size = tp,
                                          .pp_rank = pp == 2 ? r : 0,
                                          .pp_size = pp}};
          if (tp == 2)
            par.tensor = c->get();
          else
            par.world = c->get();
          auto b = cpu_backend::load(*dir, small_kv(), par, rec[r].callback());
          if (!b)
            errors[r] = b.error().to_string();
        });
      for (auto& t : ranks)
        t.join();
      uint64_t sum = 0;
      for (int r = 0; r < 2; ++r) {
        CAPTURE(r);
        REQUIRE_MESSAGE(errors[r].empty(), errors[r]);
        const uint64_t total = rec[r].reports.back().total;
        rec[r].check_monotonic_and_final(total);
        MESSAGE(std::string(name), " tensor=", tp, " pipeline=", pp, " rank ", r, ": ", total,
                " of ", whole, " bytes");
        if (tp == 2) { // replicated norms (and kv heads) aside, each rank reads its half
          CHECK(total > whole * 2 / 5);
          CHECK(total < whole * 3 / 5);
        }
        sum += total;
      }
      if (tp == 2) {
        CHECK(sum >= whole);
        CHECK(sum < whole * 6 / 5);
      } else { // stages split the checkpoint; a tied embedding is read by both
        auto config = load_model_config(*dir);
        REQUIRE(config.has_value());
        auto weights = weight_store::open(*dir);
        REQUIRE(weights.has_value());
        auto e = weights->lookup("model.embed_tokens.weight");
        REQUIRE(e.has_value());
        const uint64_t embed = e->second->end - e->second->begin;
        CHECK(sum == whole + (config->tie_word_embeddings ? embed : 0));
      }
    }
  }
}
