// What `cluster serve` shows while a deployment loads (actors/load_display.hpp): a plain line at
// a rank's start, at each new 10% of its bytes and at its end, naming the group, replica, rank
// and node; bars on a terminal redrawn in place with one line per rank.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "actors/load_display.hpp"

using namespace troupe;
using namespace troupe::actors;

namespace {

msg::rank_progress report(std::string role, int replica, int rank, uint64_t bytes, bool done) {
  return {.deployment = "qwen3-8b",
          .role = std::move(role),
          .replica = replica,
          .rank = rank,
          .tp_rank = rank % 2,
          .pp_rank = rank / 2,
          .node_id = "w1",
          .bytes = bytes,
          .total = 16'400'000'000,
          .elapsed_s = bytes / 1.1e9,
          .done = done};
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
    ++n;
  return n;
}

} // namespace

TEST_CASE("load_display: plain lines at start and each 10% step and the end of every rank") {
  std::vector<std::string> lines;
  load_display d(load_display::style::lines, [&](const std::string& l) { lines.push_back(l); });
  // Two ranks reporting every 1% (interleaved), then their ends.
  for (uint64_t pct = 0; pct < 100; ++pct)
    for (int rank = 0; rank < 2; ++rank)
      d.update(report("", 0, rank, 16'400'000'000 * pct / 100, false));
  d.update(report("", 0, 0, 16'400'000'000, true));
  d.update(report("", 0, 1, 16'400'000'000, true));
  d.update(report("", 0, 1, 16'400'000'000, true)); // a repeat prints nothing
  REQUIRE(lines.size() == 22);                      // per rank: 0%, 10% ... 90%, the end
  CHECK(lines[0] == "loading 'qwen3-8b' replica 0 rank 0 (pp 0, tp 0) on node w1: 0% (0 kB of "
                    "16.40 GB)");
  CHECK(lines[2] == "loading 'qwen3-8b' replica 0 rank 0 (pp 0, tp 0) on node w1: 10% (1.64 GB "
                    "of 16.40 GB, 1.10 GB/s)");
  CHECK(lines[20] == "loaded 'qwen3-8b' replica 0 rank 0 (pp 0, tp 0) on node w1: 100% (16.40 GB "
                     "in 14.9 s, 1.10 GB/s)");
  CHECK(lines[21].find("rank 1 (pp 0, tp 1)") != std::string::npos);
}

TEST_CASE("load_display: groups and replicas are named and a report that jumps prints once") {
  std::vector<std::string> lines;
  load_display d(load_display::style::lines, [&](const std::string& l) { lines.push_back(l); });
  d.update(report("prefill", 1, 0, 0, false));
  d.update(report("prefill", 1, 0, 16'400'000'000 * 57 / 100, false));
  d.update(report("prefill", 1, 0, 16'400'000'000 * 58 / 100, false)); // same 10% step
  d.update(report("decode", 1, 0, 0, false));                          // another rank
  REQUIRE(lines.size() == 3);
  CHECK(lines[0].find("'qwen3-8b' prefill replica 1 rank 0") != std::string::npos);
  CHECK(lines[1].find(": 57% (9.35 GB of 16.40 GB") != std::string::npos);
  CHECK(lines[2].find("decode replica 1 rank 0") != std::string::npos);
  // A rank of a `--block` process has no node.
  auto local = report("", 0, 0, 0, false);
  local.node_id.clear();
  CHECK(rank_name(local) == "replica 0 rank 0 (pp 0, tp 0)");
}

TEST_CASE("load_display: bars with one line per rank redrawn in place") {
  std::string screen;
  load_display d(
      load_display::style::bars, [&](const std::string& t) { screen += t; }, 100);
  d.update(report("", 0, 0, 0, false));
  d.update(report("", 0, 1, 16'400'000'000 / 2, true)); // an end is drawn at once
  d.flush();
  // The second frame moves back over the first one's line and redraws both ranks.
  CHECK(count(screen, "\x1b[1F") == 1);
  CHECK(count(screen, "\x1b[2K") == 3);
  const auto bar = load_display::bar_line(report("", 0, 1, 16'400'000'000 * 44 / 100, false), 100);
  CHECK(bar.size() <= 100);
  CHECK(bar.find("loading qwen3-8b  r0 pp0/tp1 @w1 [") == 0);
  CHECK(bar.find("]  44% 7.22 GB/16.40 GB 1.10 GB/s") != std::string::npos);
  const auto open = bar.find('['), close = bar.find(']');
  const std::string cells = bar.substr(open + 1, close - open - 1);
  CHECK(cells.size() >= 10);
  CHECK(cells.find_first_not_of("#.") == std::string::npos);
  CHECK(count(cells, "#") * 100 / cells.size() / 10 == 4); // 44% filled, to a cell
}

TEST_CASE("load_board: each loading rank's last report until it is done or forgotten") {
  load_board board;
  board.update(report("", 0, 1, 8'200'000'000, false));
  board.update(report("", 0, 0, 1'640'000'000, false));
  board.update(report("", 0, 0, 3'280'000'000, false)); // replaces rank 0's
  auto other = report("", 0, 0, 0, false);
  other.deployment = "other";
  board.update(other);
  auto lines = board.lines("qwen3-8b");
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].find("rank 0 (pp 0, tp 0) on node w1: 20% (3.28 GB of 16.40 GB") !=
        std::string::npos);
  CHECK(lines[1].find("rank 1 (pp 0, tp 1) on node w1: 50%") != std::string::npos);
  board.update(report("", 0, 1, 16'400'000'000, true)); // done: no longer loading
  CHECK(board.lines("qwen3-8b").size() == 1);
  board.update(report("prefill", 1, 0, 0, false));
  CHECK(board.lines("qwen3-8b").size() == 2);
  board.forget("qwen3-8b"); // a replica attempt failed: the reports are stale
  CHECK(board.lines("qwen3-8b").empty());
  CHECK(board.lines("other").size() == 1);
  CHECK(board.lines("none").empty());
}
