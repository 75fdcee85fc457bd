// Per-host daemon bookkeeping for `cluster start/join/status/stop`: the session folder
// (<temp>/session_latest -> session_<time>_<pid>, logs/, pid files, the head's address and token),
// the persistent node id, tokens, and which local address routes to the head. Blocking file and
// socket calls; any thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "runtime/error.hpp"

namespace troupe::cluster {

namespace fs = std::filesystem;

// --temp-dir, else $TROUPE_TEMP_DIR, else /tmp/troupe.
fs::path temp_root(const std::string& option);

// <root>/session_latest, created (with a fresh session_<time>_<pid> target) when `fresh` or absent.
// A new session also scrubs the secrets (token, tls/) from older session folders whose daemons
// are gone (killed, so they could not remove their own).
expected<fs::path> open_session(const fs::path& root, bool fresh);

// Pid files: <session>/<role>.pid. live_pid: the pid when that process is still running
// (not a zombie) and is a `cluster` daemon.
expected<void> write_pid_file(const fs::path& session, const std::string& role);
std::optional<int> live_pid(const fs::path& session, const std::string& role);
bool process_alive(int pid);

expected<void> write_text(const fs::path& file, const std::string& text, bool secret = false);
std::optional<std::string> read_text(const fs::path& file);

// <root>/<role>_node_id, created once with a random id and reused by every restart.
expected<std::string> stable_node_id(const fs::path& root, const std::string& role);
std::string random_token(); // 32 hex characters from /dev/urandom
uint64_t random_u64();

// "host:port" -> (host, port); the port defaults to `default_port`.
expected<std::pair<std::string, uint16_t>> parse_address(const std::string& text,
                                                         uint16_t default_port);
// The local IPv4 address of the interface the kernel routes to `host` through (a UDP connect,
// no packet is sent). Loopback for a head on this host.
expected<std::string> route_source_address(const std::string& host);
// The first non-loopback IPv4 address that is up, else 127.0.0.1 (for the printed join command).
std::string primary_address();

} // namespace troupe::cluster
