// Test harness for the multi-process control-plane tests: spawns real `cluster` processes (and
// `ip`), bounds every wait, queries `cluster status --json`, and cleans up every process it or its
// daemons started (the test process is a child subreaper, so daemons reparent to it). Blocking.
#pragma once

#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <sys/types.h>

namespace troupe::test {

namespace fs = std::filesystem;

struct run_result {
  int exit_code = -1; // -1: timed out (killed)
  std::string output; // stdout and stderr together
};

// Starts `args` (args[0] found on PATH when not absolute) with output into `log`. Never blocks.
pid_t spawn(const std::vector<std::string>& args, const fs::path& log);
// Runs to completion, killed after `timeout`.
run_result run(const std::vector<std::string>& args,
               std::chrono::milliseconds timeout = std::chrono::seconds(30));
// Waits for a child to exit; true when it did within `timeout`.
bool wait_exit(pid_t pid, std::chrono::milliseconds timeout, int* status = nullptr);
bool alive(pid_t pid); // running and not a zombie
uint16_t free_port();
// A free port whose successor is free too (a head listens on both: control plane and join
// bootstrap).
uint16_t free_port_pair();
std::string read_file(const fs::path& file);

// Polls `pred` every 50 ms until true or `limit` passes. Returns the elapsed time when true.
template <class F>
std::optional<std::chrono::milliseconds> eventually(F pred, std::chrono::milliseconds limit) {
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    if (pred())
      return std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - t0);
    if (std::chrono::steady_clock::now() - t0 > limit)
      return std::nullopt;
    usleep(50'000);
  }
}

// One test's cluster: a temp folder with one temp dir per daemon, a port and a token. The
// destructor stops every daemon (`cluster stop`), kills whatever is left and removes the folder.
class cluster_fixture {
 public:
  cluster_fixture();
  ~cluster_fixture();

  const std::string& binary() const { return binary_; }
  uint16_t port() const { return port_; }
  const std::string& token() const { return token_; }
  fs::path dir(const std::string& name) const { return root_ / name; }
  std::string head_address() const { return "127.0.0.1:" + std::to_string(port_); }
  // The cluster CA's fingerprint (`--ca-sha256`) of the head started in dir(head); empty until
  // that head has created its CA.
  std::string ca_sha256(const std::string& head = "head") const;
  // Waits (up to 30 s) for it.
  std::string wait_ca_sha256(const std::string& head = "head") const;

  // `cluster <args...>` to completion.
  run_result cluster(std::vector<std::string> args,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // `[prefix...] cluster <args...>` in the background (for --block daemons); tracked for cleanup.
  pid_t cluster_bg(const std::string& name, std::vector<std::string> args,
                   std::vector<std::string> prefix = {});
  pid_t start_head_blocking(const std::string& name = "head");
  pid_t join_blocking(const std::string& name, const std::string& address = {},
                      std::vector<std::string> prefix = {});

  // node id -> node JSON from `cluster status --json`; empty when the head does not answer.
  std::map<std::string, nlohmann::json> nodes();
  std::string state_of(const std::string& node_id);
  std::string node_id(const std::string& name, const std::string& role = "node") const;
  // For failure messages: the last lines of every daemon's foreground and session logs.
  std::string logs(size_t lines_each = 30) const;

  void track(pid_t pid) { pids_.push_back(pid); }

 private:
  std::string binary_;
  fs::path root_;
  uint16_t port_;
  std::string token_;
  std::vector<pid_t> pids_;
  std::vector<std::string> names_;
};

} // namespace troupe::test
