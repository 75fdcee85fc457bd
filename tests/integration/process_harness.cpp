#include "process_harness.hpp"

#include "cluster/tls.hpp"

#include <csignal>
#include <fcntl.h>
#include <fstream>
#include <netinet/in.h>
#include <random>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef TROUPE_CLUSTER_BIN
#error "TROUPE_CLUSTER_BIN must name the cluster executable"
#endif

namespace troupe::test {

using namespace std::chrono_literals;

pid_t spawn(const std::vector<std::string>& args, const fs::path& log) {
  pid_t pid = fork();
  if (pid != 0)
    return pid;
  int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  int null_fd = open("/dev/null", O_RDONLY);
  dup2(null_fd, 0);
  dup2(fd, 1);
  dup2(fd, 2);
  std::vector<char*> argv;
  for (const auto& a : args)
    argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  _exit(127);
}

bool wait_exit(pid_t pid, std::chrono::milliseconds timeout, int* status) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  int st = 0;
  for (;;) {
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD)) {
      if (status != nullptr)
        *status = r == pid ? st : 0;
      return true;
    }
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    usleep(20'000);
  }
}

bool alive(pid_t pid) {
  waitpid(pid, nullptr, WNOHANG); // reap when it is our child (or reparented to us)
  if (pid <= 0 || kill(pid, 0) != 0)
    return false;
  std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  auto close = stat.rfind(')');
  return close == std::string::npos || close + 2 >= stat.size() || stat[close + 2] != 'Z';
}

run_result run(const std::vector<std::string>& args, std::chrono::milliseconds timeout) {
  char name[] = "/tmp/troupe_test_run_XXXXXX";
  int fd = mkstemp(name);
  close(fd);
  pid_t pid = spawn(args, name);
  run_result r;
  int status = 0;
  if (wait_exit(pid, timeout, &status)) {
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  } else {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
  r.output = read_file(name);
  unlink(name);
  return r;
}

namespace {

// A socket bound to 127.0.0.1:port (0: any free port); -1 when that port is taken.
int bound_socket(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

uint16_t port_of(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

} // namespace

uint16_t free_port() {
  int fd = bound_socket(0);
  const uint16_t port = port_of(fd);
  close(fd);
  return port;
}

uint16_t free_port_pair() {
  for (;;) {
    int fd = bound_socket(0);
    const uint16_t port = port_of(fd);
    int next = port < 65535 ? bound_socket(port + 1) : -1;
    close(fd);
    if (next >= 0) {
      close(next);
      return port;
    }
  }
}

std::string read_file(const fs::path& file) {
  std::ifstream in(file);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

cluster_fixture::cluster_fixture() : binary_(TROUPE_CLUSTER_BIN), port_(free_port_pair()) {
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  std::random_device rd;
  token_ = "test-token-" + std::to_string(rd());
  root_ = fs::temp_directory_path() /
          ("troupe_it_" + std::to_string(getpid()) + "_" + std::to_string(rd()));
  fs::create_directories(root_);
}

cluster_fixture::~cluster_fixture() {
  for (const auto& entry : fs::directory_iterator(root_))
    if (entry.is_directory())
      run({binary_, "stop", "--grace", "2", "--temp-dir", entry.path().string()}, 10s);
  for (pid_t pid : pids_) {
    kill(pid, SIGKILL);
    wait_exit(pid, 2s);
  }
  // Anything else reparented to us (daemons of `cluster start/join`): kill and reap.
  while (waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  std::error_code ec;
  fs::remove_all(root_, ec);
}

run_result cluster_fixture::cluster(std::vector<std::string> args,
                                    std::chrono::milliseconds timeout) {
  args.insert(args.begin(), binary_);
  return run(args, timeout);
}

pid_t cluster_fixture::cluster_bg(const std::string& name, std::vector<std::string> args,
                                  std::vector<std::string> prefix) {
  fs::create_directories(dir(name));
  args.insert(args.begin(), binary_);
  args.insert(args.begin(), prefix.begin(), prefix.end());
  pid_t pid = spawn(args, dir(name) / "foreground.log");
  track(pid);
  return pid;
}

pid_t cluster_fixture::start_head_blocking(const std::string& name) {
  return cluster_bg(name, {"start", "--head", "--block", "--port", std::to_string(port_), "--token",
                           token_, "--temp-dir", dir(name).string()});
}

std::string cluster_fixture::ca_sha256(const std::string& head) const {
  const auto pem = read_file(dir(head) / "cluster_ca" / "ca.pem");
  if (pem.empty())
    return {};
  auto fp = troupe::cluster::tls::fingerprint(pem);
  return fp ? *fp : std::string{};
}

std::string cluster_fixture::wait_ca_sha256(const std::string& head) const {
  std::string fp;
  eventually([&] { return !(fp = ca_sha256(head)).empty(); }, std::chrono::seconds(30));
  return fp;
}

pid_t cluster_fixture::join_blocking(const std::string& name, const std::string& address,
                                     std::vector<std::string> prefix) {
  return cluster_bg(name,
                    {"join", address.empty() ? head_address() : address, "--block", "--token",
                     token_, "--ca-sha256", wait_ca_sha256(), "--num-gpus", "2", "--temp-dir",
                     dir(name).string()},
                    std::move(prefix));
}

std::map<std::string, nlohmann::json> cluster_fixture::nodes() {
  auto r = cluster({"status", "--json", "--address", head_address(), "--token", token_,
                    "--ca-sha256", ca_sha256(), "--timeout", "2"},
                   10s);
  std::map<std::string, nlohmann::json> out;
  if (r.exit_code != 0)
    return out;
  auto json = nlohmann::json::parse(r.output, nullptr, false);
  if (json.is_discarded() || !json.contains("nodes"))
    return out;
  for (auto& n : json["nodes"])
    out[n["node_id"].get<std::string>()] = n;
  return out;
}

std::string cluster_fixture::state_of(const std::string& node_id) {
  auto all = nodes();
  auto it = all.find(node_id);
  return it == all.end() ? "absent" : it->second["state"].get<std::string>();
}

std::string cluster_fixture::node_id(const std::string& name, const std::string& role) const {
  std::string id = read_file(dir(name) / (role + "_node_id"));
  while (!id.empty() && id.back() == '\n')
    id.pop_back();
  return id;
}

std::string cluster_fixture::logs(size_t lines_each) const {
  std::string out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root_, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file() || it->path().extension() != ".log")
      continue;
    const auto text = read_file(it->path());
    size_t start = text.size();
    for (size_t n = 0; start > 0 && n <= lines_each; --start)
      if (text[start - 1] == '\n')
        ++n;
    out += "--- " + fs::relative(it->path(), root_).string() + "\n" + text.substr(start);
  }
  return out;
}

} // namespace troupe::test
