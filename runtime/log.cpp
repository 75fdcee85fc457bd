#include "runtime/log.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

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
  fmt::print(stderr, "[{}.{:03d}] {:5} {}\n", ms / 1000, ms % 1000, names[static_cast<int>(lvl)],
             text);
}

} // namespace troupe::log
