#include "parallel/rank_processes.hpp"

#include <csignal>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

namespace troupe::test {

std::vector<rank_outcome>
run_ranks(int ranks, const std::function<int(int rank, const std::filesystem::path&)>& body,
          std::chrono::seconds deadline) {
  static int run_counter = 0;
  auto folder =
      std::filesystem::temp_directory_path() /
      ("troupe-ranks-" + std::to_string(::getpid()) + "-" + std::to_string(run_counter++));
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  std::vector<pid_t> pids;
  for (int r = 0; r < ranks; ++r) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::signal(SIGPIPE, SIG_IGN); // as the cluster's processes do (cli/main.cpp)
      int rc = 1;
      try {
        rc = body(r, folder);
      } catch (...) {
        rc = 2;
      }
      ::_exit(rc);
    }
    pids.push_back(pid);
  }
  std::vector<rank_outcome> out(static_cast<size_t>(ranks));
  std::vector<bool> done(static_cast<size_t>(ranks), false);
  auto until = std::chrono::steady_clock::now() + deadline;
  int left = ranks;
  while (left > 0 && std::chrono::steady_clock::now() < until) {
    for (int r = 0; r < ranks; ++r) {
      int status = 0;
      if (done[r] || ::waitpid(pids[r], &status, WNOHANG) != pids[r])
        continue;
      done[r] = true;
      --left;
      out[r].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      if (WIFSIGNALED(status))
        out[r].signal = WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (int r = 0; r < ranks; ++r) {
    if (!done[r]) {
      ::kill(pids[r], SIGKILL);
      ::waitpid(pids[r], nullptr, 0);
    }
    std::ifstream f(folder / ("rank" + std::to_string(r) + ".txt"));
    std::stringstream ss;
    ss << f.rdbuf();
    out[r].message = ss.str();
    if (out[r].message.empty() && out[r].signal != 0) // says why in a failing check
      out[r].message = std::string("killed by signal ") + ::strsignal(out[r].signal);
  }
  std::filesystem::remove_all(folder);
  return out;
}

} // namespace troupe::test
