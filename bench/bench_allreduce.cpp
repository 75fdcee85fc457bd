// All-reduce latency and bandwidth through comm::communicator (Gloo over loopback TCP) for
// decode-sized messages (hidden x batch floats), against a plain TCP ping-pong of the same bytes.
// Usage: bench_allreduce [ranks=2] [iterations=200]. Ranks are forked processes; rank 0 prints.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/comm/communicator.hpp"

using namespace troupe::engine;
using clk = std::chrono::steady_clock;

namespace {

struct message {
  int hidden, batch;
};
const std::vector<message> sizes{{4096, 1},   {4096, 8}, {4096, 32},
                                 {4096, 128}, {8192, 1}, {8192, 32}};

double median_us(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run_rank(int rank, int ranks, int iterations, const std::string& dir) {
  auto store = comm::make_folder_store(dir);
  auto c = comm::make_gloo_communicator(*store, rank, ranks, {.prefix = "bench"});
  if (!c) {
    std::fprintf(stderr, "%s\n", c.error().to_string().c_str());
    std::exit(1);
  }
  if (rank == 0)
    std::printf("| hidden x batch | bytes (fp32) | ranks | all-reduce p50 us | algbw GB/s | busbw "
                "GB/s |\n| --- | --- | --- | --- | --- | --- |\n");
  for (auto m : sizes) {
    std::vector<float> x(static_cast<size_t>(m.hidden) * m.batch, 1.0f);
    std::vector<double> us;
    for (int i = 0; i < iterations + 20; ++i) {
      (void)(*c)->barrier();
      auto t0 = clk::now();
      if (!(*c)->all_reduce_sum(x))
        std::exit(1);
      double t = std::chrono::duration<double, std::micro>(clk::now() - t0).count();
      if (i >= 20)
        us.push_back(t);
    }
    double p50 = median_us(us), bytes = static_cast<double>(x.size() * sizeof(float));
    if (rank == 0)
      std::printf("| %d x %d | %.0f | %d | %.1f | %.2f | %.2f |\n", m.hidden, m.batch, bytes, ranks,
                  p50, bytes / p50 / 1e3, bytes / p50 / 1e3 * 2.0 * (ranks - 1) / ranks);
  }
}

// A plain TCP ping-pong of the same bytes between two processes on loopback.
void tcp_pingpong(int iterations) {
  int ls = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::listen(ls, 1);
  ::getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len);
  auto full = [](int fd, char* p, size_t n, bool send) {
    while (n > 0) {
      ssize_t k = send ? ::send(fd, p, n, 0) : ::recv(fd, p, n, 0);
      if (k <= 0)
        std::exit(1);
      p += k;
      n -= static_cast<size_t>(k);
    }
  };
  std::fflush(stdout); // a forked child must not print the parent's buffered output again
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      std::exit(1);
    for (auto m : sizes) {
      std::vector<char> buf(static_cast<size_t>(m.hidden) * m.batch * sizeof(float));
      for (int i = 0; i < iterations + 20; ++i) {
        full(fd, buf.data(), buf.size(), false);
        full(fd, buf.data(), buf.size(), true);
      }
    }
    ::_exit(0);
  }
  int fd = ::accept(ls, nullptr, nullptr);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::printf(
      "\n| hidden x batch | bytes | TCP ping-pong round trip p50 us |\n| --- | --- | --- |\n");
  for (auto m : sizes) {
    std::vector<char> buf(static_cast<size_t>(m.hidden) * m.batch * sizeof(float));
    std::vector<double> us;
    for (int i = 0; i < iterations + 20; ++i) {
      auto t0 = clk::now();
      full(fd, buf.data(), buf.size(), true);
      full(fd, buf.data(), buf.size(), false);
      double t = std::chrono::duration<double, std::micro>(clk::now() - t0).count();
      if (i >= 20)
        us.push_back(t);
    }
    std::printf("| %d x %d | %zu | %.1f |\n", m.hidden, m.batch, buf.size(), median_us(us));
  }
  ::waitpid(pid, nullptr, 0);
  ::close(fd);
  ::close(ls);
}

} // namespace

int main(int argc, char** argv) {
  const int ranks = argc > 1 ? std::atoi(argv[1]) : 2;
  const int iterations = argc > 2 ? std::atoi(argv[2]) : 200;
  auto dir = std::filesystem::temp_directory_path() / ("troupe-bench-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::vector<pid_t> pids;
  std::fflush(stdout);
  for (int r = 1; r < ranks; ++r) {
    pid_t pid = ::fork();
    if (pid == 0) {
      run_rank(r, ranks, iterations, dir.string());
      std::fflush(stdout);
      ::_exit(0);
    }
    pids.push_back(pid);
  }
  run_rank(0, ranks, iterations, dir.string());
  int failed = 0;
  for (auto pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::filesystem::remove_all(dir);
  if (ranks == 2)
    tcp_pingpong(iterations);
  return failed;
}
