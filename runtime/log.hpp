// Leveled logging to stderr through fmt; daemons redirect stderr into their session log.
// Thread-safe (one write per line). Level from TROUPE_LOG (debug|info|warn|error, default info);
// format from TROUPE_LOG_FORMAT or set_format() (`--log-format`): text lines
// "[2026-01-02 03:04:05.678Z] info  message", or JSON lines
// {"time": "2026-01-02T03:04:05.678Z", "level": "info", "msg": "message"}.
#pragma once

#include <string>
#include <string_view>

#include <fmt/format.h>

namespace troupe::log {

enum class level { debug = 0, info = 1, warn = 2, error = 3 };
enum class format { text, json };

level threshold();
void write(level lvl, std::string_view text);
// "text" or "json"; false for anything else.
bool set_format(std::string_view name);
format current_format();
// `text` as a JSON string literal, quotes included.
std::string json_quote(std::string_view text);

template <class... Ts>
void debug(fmt::format_string<Ts...> f, Ts&&... args) {
  if (threshold() <= level::debug)
    write(level::debug, fmt::format(f, std::forward<Ts>(args)...));
}
template <class... Ts>
void info(fmt::format_string<Ts...> f, Ts&&... args) {
  if (threshold() <= level::info)
    write(level::info, fmt::format(f, std::forward<Ts>(args)...));
}
template <class... Ts>
void warn(fmt::format_string<Ts...> f, Ts&&... args) {
  if (threshold() <= level::warn)
    write(level::warn, fmt::format(f, std::forward<Ts>(args)...));
}
template <class... Ts>
void error(fmt::format_string<Ts...> f, Ts&&... args) {
  write(level::error, fmt::format(f, std::forward<Ts>(args)...));
}

} // namespace troupe::log
