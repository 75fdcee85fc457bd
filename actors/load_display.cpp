#include "actors/load_display.hpp"

#include <algorithm>
#include <climits>

#include <fmt/format.h>

namespace troupe::actors {

namespace {

auto key_of(const msg::rank_progress& p) {
  return std::tuple{p.role, p.replica, p.rank};
}

double rate_of(const msg::rank_progress& p) {
  return p.elapsed_s > 0 ? static_cast<double>(p.bytes) / p.elapsed_s : 0.0;
}

// "r0", "prefill r1": the replica in a bar line.
std::string short_replica(const msg::rank_progress& p) {
  return (p.role.empty() ? "" : p.role + " ") + fmt::format("r{}", p.replica);
}

} // namespace

std::string format_bytes(double b) {
  if (b >= 1e9)
    return fmt::format("{:.2f} GB", b / 1e9);
  if (b >= 1e6)
    return fmt::format("{:.1f} MB", b / 1e6);
  return fmt::format("{:.0f} kB", b / 1e3);
}

int percent_of(uint64_t bytes, uint64_t total) {
  if (total == 0)
    return 100;
  return static_cast<int>(std::min<uint64_t>(100, bytes * 100 / total));
}

std::string rank_name(const msg::rank_progress& p) {
  return fmt::format("{}replica {} rank {} (pp {}, tp {}){}", p.role.empty() ? "" : p.role + " ",
                     p.replica, p.rank, p.pp_rank, p.tp_rank,
                     p.node_id.empty() ? "" : " on node " + p.node_id);
}

std::string progress_line(const msg::rank_progress& p) {
  const double rate = rate_of(p);
  if (p.done)
    return fmt::format("loaded '{}' {}: {}% ({} in {:.1f} s, {}/s)", p.deployment, rank_name(p),
                       percent_of(p.bytes, p.total), format_bytes(static_cast<double>(p.bytes)),
                       p.elapsed_s, format_bytes(rate));
  return fmt::format("loading '{}' {}: {}% ({} of {}{})", p.deployment, rank_name(p),
                     percent_of(p.bytes, p.total), format_bytes(static_cast<double>(p.bytes)),
                     format_bytes(static_cast<double>(p.total)),
                     p.bytes > 0 ? fmt::format(", {}/s", format_bytes(rate)) : "");
}

void load_board::update(const msg::rank_progress& p) {
  auto key = std::tuple{p.deployment, p.role, p.replica, p.rank};
  if (p.done)
    ranks_.erase(key);
  else
    ranks_[key] = p;
}

void load_board::forget(const std::string& deployment) {
  std::erase_if(ranks_, [&](const auto& kv) { return std::get<0>(kv.first) == deployment; });
}

std::vector<std::string> load_board::lines(const std::string& deployment) const {
  std::vector<std::string> out;
  for (auto it = ranks_.lower_bound({deployment, "", INT32_MIN, INT32_MIN});
       it != ranks_.end() && std::get<0>(it->first) == deployment; ++it)
    out.push_back(progress_line(it->second));
  return out;
}

bool progress_steps::due(const msg::rank_progress& p) {
  // Steps 0..9 by tenths of the total; 10 is the end (done), which always gets its line.
  const int step = p.done ? 10 : std::min(9, percent_of(p.bytes, p.total) / 10);
  auto [it, first] = last_.try_emplace(key_of(p), step);
  if (first)
    return true;
  if (step <= it->second)
    return false;
  it->second = step;
  return true;
}

load_display::load_display(style s, std::function<void(const std::string&)> out, int width)
  : style_(s), out_(std::move(out)), width_(std::max(width, 40)) {}

std::string load_display::bar_line(const msg::rank_progress& p, int width) {
  const std::string head = fmt::format("{} {}  {} pp{}/tp{}{}", p.done ? "loaded " : "loading",
                                       p.deployment, short_replica(p), p.pp_rank, p.tp_rank,
                                       p.node_id.empty() ? "" : " @" + p.node_id);
  const std::string tail = fmt::format(" {:>3}% {}/{} {}", percent_of(p.bytes, p.total),
                                       format_bytes(static_cast<double>(p.bytes)),
                                       format_bytes(static_cast<double>(p.total)),
                                       p.done ? fmt::format("done in {:.1f} s", p.elapsed_s)
                                              : fmt::format("{}/s", format_bytes(rate_of(p))));
  // The bar keeps its size while the numbers after it change: room for the widest of them.
  constexpr int widest_tail = 34; // " 100% 999.99 GB/999.99 GB 999.9 MB/s"
  const int room = width - static_cast<int>(head.size()) - widest_tail - 3;
  const int cells = std::clamp(room, 10, 40);
  const int full = cells * percent_of(p.bytes, p.total) / 100;
  return fmt::format("{} [{}{}]{}", head, std::string(static_cast<size_t>(full), '#'),
                     std::string(static_cast<size_t>(cells - full), '.'), tail);
}

void load_display::update(const msg::rank_progress& p) {
  if (style_ == style::lines) {
    if (steps_.due(p))
      out_(progress_line(p));
    return;
  }
  ranks_[key_of(p)] = p;
  dirty_ = true;
  // At most ten frames a second; a rank's end is drawn at once.
  const auto now = std::chrono::steady_clock::now();
  if (p.done || now - last_draw_ >= std::chrono::milliseconds(100))
    draw();
}

void load_display::flush() {
  if (style_ == style::bars && dirty_)
    draw();
}

void load_display::draw() {
  // Back to the first line of the last frame, then every line rewritten (cleared to its end).
  std::string text = drawn_ > 0 ? fmt::format("\x1b[{}F", drawn_) : "";
  for (const auto& [key, p] : ranks_)
    text += "\x1b[2K" + bar_line(p, width_) + "\n";
  drawn_ = static_cast<int>(ranks_.size());
  last_draw_ = std::chrono::steady_clock::now();
  dirty_ = false;
  out_(text);
}

} // namespace troupe::actors
