// What `cluster serve` shows while a deployment loads (README "Logs"): every rank's load
// progress (msg::rank_progress) as plain lines at each 10% of the rank's bytes and at its end, or,
// on a terminal, one progress bar per rank redrawn in place. Also the 10% steps a worker logs in
// its node's log. Plain C++, no actor: the caller says where the text goes and calls update()
// from one thread at a time.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "actors/messages.hpp"

namespace troupe::actors {

// "7.20 GB", "12.3 MB", "512 kB".
std::string format_bytes(double bytes);
// Percent of `total` read, 100 when there is nothing to read; never above 100.
int percent_of(uint64_t bytes, uint64_t total);
// "replica 0 rank 1 (pp 0, tp 1) on node 5e0c2b9a41d7"; "prefill replica 1 rank 0 (pp 0, tp 0)"
// (a rank of the `--block` process names no node).
std::string rank_name(const msg::rank_progress& p);
// "loading 'qwen3-8b' replica 0 rank 1 (pp 0, tp 1) on node N: 40% (6.56 of 16.40 GB, 1.10
// GB/s)", or when done "loaded 'qwen3-8b' ...: 100% (16.40 GB in 14.9 s, 1.10 GB/s)".
std::string progress_line(const msg::rank_progress& p);

// Which reports deserve a plain line: a rank's first report (0%: its total is known), each new
// 10% step, and its last (done), once.
class progress_steps {
 public:
  bool due(const msg::rank_progress& p);

 private:
  std::map<std::tuple<std::string, int32_t, int32_t>, int> last_; // (role, replica, rank) -> step
};

// The head's view of the loads in flight, for `cluster status`: each rank still reading its
// weights, by its last report (a first load's or a restarted replica's).
class load_board {
 public:
  void update(const msg::rank_progress& p); // a `done` report forgets the rank
  // A replica attempt failed or the deployment went away: its reports are stale.
  void forget(const std::string& deployment);
  // progress_line() of each of `deployment`'s loading ranks, in (role, replica, rank) order.
  std::vector<std::string> lines(const std::string& deployment) const;

 private:
  std::map<std::tuple<std::string, std::string, int32_t, int32_t>, msg::rank_progress> ranks_;
};

class load_display {
 public:
  enum class style {
    lines, // one progress_line per due step, to `out` (a log line each)
    bars,  // every rank's bar, redrawn in place: `out` gets terminal text to write as is
  };
  load_display(style s, std::function<void(const std::string&)> out, int width = 100);

  void update(const msg::rank_progress& p);
  // bars: the frame as of now (already drawn by update unless it was rate-limited).
  void flush();

  // One rank's bar line without control characters, e.g. "loading qwen3-8b  r0 pp0/tp1 @node
  // [#####.....]  44% 7.20 GB/16.40 GB 1.10 GB/s" ("loaded  ..." and the time taken once done),
  // fit to `width` columns by the bar's length (10 to 40 cells).
  static std::string bar_line(const msg::rank_progress& p, int width);

 private:
  void draw();

  style style_;
  std::function<void(const std::string&)> out_;
  int width_;
  progress_steps steps_;
  std::map<std::tuple<std::string, int32_t, int32_t>, msg::rank_progress> ranks_;
  int drawn_ = 0; // lines of the last frame
  std::chrono::steady_clock::time_point last_draw_{};
  bool dirty_ = false;
};

} // namespace troupe::actors
