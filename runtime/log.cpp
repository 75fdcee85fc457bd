#include "runtime/log.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <fmt/chrono.h>

namespace troupe::log {

level threshold() {
  static const level value = [] {
    const char* env = std::getenv("TROUPE_LOG");
    if (env == nullptr)
      return level::info;
    if (std::strcmp(env, "debug") == 0)
      return level::debug;
    if (std::strcmp(env, "warn") == 0)
      return level::warn;
    if (std::strcmp(env, "error") == 0)
      return level::error;
    return level::info;
  }();
  return value;
}

void write(level lvl, std::string_view text) {
  static constexpr const char* names[] = {"debug", "info", "warn", "error"};
  using namespace std::chrono;
  auto ms = duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
  std::time_t seconds = static_cast<std::time_t>(ms / 1000);
  fmt::print(stderr, "[{:%Y-%m-%d %H:%M:%S}.{:03d}Z] {:5} {}\n", fmt::gmtime(seconds), ms % 1000,
             names[static_cast<int>(lvl)], text);
}

} // namespace troupe::log
