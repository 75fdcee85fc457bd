// Minimal leveled logging to stderr through fmt; daemons redirect stderr into their session log.
// Thread-safe (one fmt::print per line). Level from TROUPE_LOG (debug|info|warn|error), default
// info.
#pragma once

#include <string_view>

#include <fmt/format.h>

namespace troupe::log {

enum class level { debug = 0, info = 1, warn = 2, error = 3 };

level threshold();
void write(level lvl, std::string_view text);

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
