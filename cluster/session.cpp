#include "cluster/session.hpp"

#include <arpa/inet.h>
#include <csignal>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <fstream>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

namespace troupe::cluster {

fs::path temp_root(const std::string& option) {
  if (!option.empty())
    return option;
  if (const char* env = std::getenv("TROUPE_TEMP_DIR"); env != nullptr && *env != '\0')
    return env;
  return "/tmp/troupe";
}

namespace {

void scrub_old_sessions(const fs::path& root, const std::string& keep) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == keep || name.rfind("session_", 0) != 0 || name == "session_latest" ||
        !entry.is_directory(ec))
      continue;
    if (live_pid(entry.path(), "head") || live_pid(entry.path(), "node"))
      continue;
    fs::remove(entry.path() / "token", ec);
    fs::remove_all(entry.path() / "tls", ec);
  }
}

} // namespace

expected<fs::path> open_session(const fs::path& root, bool fresh) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create {}: {}", root.string(), ec.message());
  const fs::path latest = root / "session_latest";
  if (!fresh && fs::is_directory(latest, ec))
    return latest;
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d_%H-%M-%S", &tm);
  const std::string name = fmt::format("session_{}_{}", stamp, getpid());
  fs::create_directories(root / name / "logs", ec);
  if (ec)
    return make_error(errc::io_error, "cannot create session folder {}: {}", (root / name).string(),
                      ec.message());
  const fs::path tmp_link = root / fmt::format(".session_latest.{}", getpid());
  fs::remove(tmp_link, ec);
  fs::create_directory_symlink(name, tmp_link, ec);
  if (!ec)
    fs::rename(tmp_link, latest, ec); // atomic replace of the symlink
  if (ec)
    return make_error(errc::io_error, "cannot point {} at {}: {}", latest.string(), name,
                      ec.message());
  scrub_old_sessions(root, name);
  return latest;
}

expected<void> write_text(const fs::path& file, const std::string& text, bool secret) {
  const fs::path tmp = file.string() + ".tmp";
  std::error_code ec;
  fs::remove(tmp, ec);
  // A secret's file is 0600 from its creation on: never readable by others, not even briefly.
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, secret ? 0600 : 0644);
  if (fd < 0)
    return make_error(errc::io_error, "cannot write {}: {}", file.string(), std::strerror(errno));
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  if (!ok)
    return make_error(errc::io_error, "cannot write {}: {}", file.string(), std::strerror(errno));
  fs::rename(tmp, file, ec);
  if (ec)
    return make_error(errc::io_error, "cannot write {}: {}", file.string(), ec.message());
  return {};
}

std::optional<std::string> read_text(const fs::path& file) {
  std::ifstream in(file);
  if (!in)
    return std::nullopt;
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!text.empty() && (text.back() == '\n' || text.back() == ' '))
    text.pop_back();
  return text;
}

expected<void> write_pid_file(const fs::path& session, const std::string& role) {
  return write_text(session / (role + ".pid"), std::to_string(getpid()) + "\n");
}

bool process_alive(int pid) {
  if (pid <= 0 || kill(pid, 0) != 0)
    return false;
  auto stat = read_text(fmt::format("/proc/{}/stat", pid));
  if (!stat)
    return false;
  auto close = stat->rfind(')'); // "pid (comm) S ..."
  return close == std::string::npos || close + 2 >= stat->size() || (*stat)[close + 2] != 'Z';
}

std::optional<int> live_pid(const fs::path& session, const std::string& role) {
  auto text = read_text(session / (role + ".pid"));
  if (!text)
    return std::nullopt;
  int pid = std::atoi(text->c_str());
  if (!process_alive(pid))
    return std::nullopt;
  // Guard against a recycled pid: the process must be a `cluster` daemon.
  std::ifstream in(fmt::format("/proc/{}/cmdline", pid));
  std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (cmdline.find("cluster") == std::string::npos)
    return std::nullopt;
  return pid;
}

uint64_t random_u64() {
  uint64_t v = 0;
  std::ifstream in("/dev/urandom", std::ios::binary);
  in.read(reinterpret_cast<char*>(&v), sizeof v);
  return v;
}

std::string random_token() {
  return fmt::format("{:016x}{:016x}", random_u64(), random_u64());
}

expected<std::string> stable_node_id(const fs::path& root, const std::string& role) {
  const fs::path file = root / (role + "_node_id");
  if (auto id = read_text(file); id && !id->empty())
    return *id;
  std::string id = fmt::format("{:016x}", random_u64()).substr(0, 12);
  std::error_code ec;
  fs::create_directories(root, ec);
  TROUPE_TRY_VOID(write_text(file, id + "\n"));
  return id;
}

expected<std::pair<std::string, uint16_t>> parse_address(const std::string& text,
                                                         uint16_t default_port) {
  std::string host = text;
  long port = default_port;
  if (auto colon = text.rfind(':'); colon != std::string::npos) {
    host = text.substr(0, colon);
    try {
      size_t used = 0;
      port = std::stol(text.substr(colon + 1), &used);
      if (used != text.size() - colon - 1)
        throw std::invalid_argument(text);
    } catch (const std::exception&) {
      port = -1;
    }
  }
  if (host.empty() || port <= 0 || port > 65535)
    return make_error(errc::invalid_argument, "'{}' is not an address (expected HOST:PORT)", text);
  return std::pair{host, static_cast<uint16_t>(port)};
}

expected<std::string> route_source_address(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), "9", &hints, &res); rc != 0)
    return make_error(errc::not_found, "cannot resolve {}: {}", host, gai_strerror(rc));
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in local{};
  socklen_t len = sizeof local;
  bool ok = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0 &&
            getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
  freeaddrinfo(res);
  if (fd >= 0)
    close(fd);
  if (!ok)
    return make_error(errc::unavailable, "no route to {}", host);
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &local.sin_addr, buf, sizeof buf);
  return std::string(buf);
}

std::string primary_address() {
  ifaddrs* list = nullptr;
  std::string found = "127.0.0.1";
  if (getifaddrs(&list) != 0)
    return found;
  for (ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET ||
        (a->ifa_flags & IFF_LOOPBACK) || !(a->ifa_flags & IFF_UP))
      continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof buf);
    found = buf;
    break;
  }
  freeifaddrs(list);
  return found;
}

} // namespace troupe::cluster
