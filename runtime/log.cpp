#include "runtime/log.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <fmt/chrono.h>

namespace troupe::log {

namespace {

std::atomic<format>& format_slot() {
  static std::atomic<format> f = [] {
    const char* env = std::getenv("TROUPE_LOG_FORMAT");
    return env != nullptr && std::strcmp(env, "json") == 0 ? format::json : format::text;
  }();
  return f;
}

} // namespace

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

bool set_format(std::string_view name) {
  if (name == "text")
    format_slot() = format::text;
  else if (name == "json")
    format_slot() = format::json;
  else
    return false;
  return true;
}

format current_format() {
  return format_slot();
}

std::string json_quote(std::string_view text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20) {
      out += fmt::format("\\u{:04x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

void write(level lvl, std::string_view text) {
  static constexpr const char* names[] = {"debug", "info", "warn", "error"};
  using namespace std::chrono;
  auto ms = duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
  std::time_t seconds = static_cast<std::time_t>(ms / 1000);
  if (current_format() == format::json)
    fmt::print(stderr,
               "{{\"time\": \"{:%Y-%m-%dT%H:%M:%S}.{:03d}Z\", \"level\": \"{}\", "
               "\"msg\": {}}}\n",
               fmt::gmtime(seconds), ms % 1000, names[static_cast<int>(lvl)], json_quote(text));
  else
    fmt::print(stderr, "[{:%Y-%m-%d %H:%M:%S}.{:03d}Z] {:5} {}\n", fmt::gmtime(seconds), ms % 1000,
               names[static_cast<int>(lvl)], text);
}

} // namespace troupe::log
