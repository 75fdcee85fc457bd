// All-reduce latency and bandwidth through comm::communicator (Gloo over loopback TCP) for
// decode-sized messages (hidden x batch floats), against a plain TCP ping-pong of the same bytes;
// with --device, through comm::device_communicator on bf16 device buffers: host-staged over Gloo
// (ranks sharing GPU 0 when there is one GPU) and NCCL (one GPU per rank, or one rank).
// Usage: bench_allreduce [--device] [ranks=2] [iterations=200]. Ranks are forked processes (before
// any CUDA call); rank 0 prints.
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
#include "engine/comm/device_communicator.hpp"
#ifdef TROUPE_WITH_CUDA
#include <cuda_runtime.h>
#endif

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

#ifdef TROUPE_WITH_CUDA
// One rank of the device benchmark: bf16 all-reduce of hidden x batch on a device buffer,
// enqueued and synchronized per iteration (what a decode step pays per all-reduce, eagerly).
int run_device_rank(int rank, int ranks, int iterations, const std::string& dir, bool nccl) {
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  const int device = rank % gpus;
  cudaSetDevice(device);
  auto store = comm::make_folder_store(dir);
  std::unique_ptr<comm::communicator> host;
  std::unique_ptr<comm::device_communicator> c;
  if (nccl) {
    auto n = comm::make_nccl_communicator(*store, rank, ranks, {.device = device});
    if (!n) {
      std::fprintf(stderr, "%s\n", n.error().to_string().c_str());
      return 1;
    }
    c = std::move(*n);
  } else {
    auto g = comm::make_gloo_communicator(*store, rank, ranks, {.prefix = "staged"});
    if (!g) {
      std::fprintf(stderr, "%s\n", g.error().to_string().c_str());
      return 1;
    }
    host = std::move(*g);
    c = std::move(*comm::make_host_staged_communicator(*host));
  }
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const auto s = reinterpret_cast<comm::device_stream>(stream);
  void* buf = nullptr;
  cudaMalloc(&buf, 8192 * 128 * 2);
  cudaMemset(buf, 0, 8192 * 128 * 2);
  for (auto m : sizes) {
    const size_t n = static_cast<size_t>(m.hidden) * m.batch;
    std::vector<double> us;
    for (int i = 0; i < iterations + 20; ++i) {
      auto t0 = clk::now();
      auto r = c->all_reduce_sum(buf, n, comm::device_dtype::bf16, s);
      if (r)
        r = c->synchronize(s);
      if (!r) {
        std::fprintf(stderr, "%s\n", r.error().to_string().c_str());
        return 1;
      }
      double t = std::chrono::duration<double, std::micro>(clk::now() - t0).count();
      if (i >= 20)
        us.push_back(t);
    }
    double p50 = median_us(us), bytes = static_cast<double>(n * 2);
    if (rank == 0)
      std::printf("| %d x %d | %.0f | %s | %d | %.1f | %.2f | %.2f |\n", m.hidden, m.batch, bytes,
                  c->name().c_str(), ranks, p50, bytes / p50 / 1e3,
                  bytes / p50 / 1e3 * 2.0 * (ranks - 1) / ranks);
  }
  std::fflush(stdout);
  c.reset();
  cudaFree(buf);
  cudaStreamDestroy(stream);
  return 0;
}

// Forks `ranks` processes running run_device_rank; 0 when every one succeeded.
int device_group(int ranks, int iterations, bool nccl) {
  auto dir = std::filesystem::temp_directory_path() /
             ("troupe-bench-dev-" + std::to_string(getpid()) + (nccl ? "-nccl" : "-staged"));
  std::filesystem::remove_all(dir);
  std::fflush(stdout);
  std::vector<pid_t> pids;
  for (int r = 0; r < ranks; ++r) {
    pid_t pid = ::fork();
    if (pid == 0)
      ::_exit(run_device_rank(r, ranks, iterations, dir.string(), nccl));
    pids.push_back(pid);
  }
  int failed = 0;
  for (auto pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    failed |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::filesystem::remove_all(dir);
  return failed;
}

// The GPU count, asked in a child so that this process stays free of CUDA (its children fork).
int gpu_count() {
  pid_t pid = ::fork();
  if (pid == 0) {
    int n = 0;
    ::_exit(cudaGetDeviceCount(&n) == cudaSuccess ? std::min(n, 100) : 0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 0;
}

int device_main(int ranks, int iterations) {
  const int gpus = gpu_count();
  if (gpus == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::printf("| hidden x batch | bytes (bf16) | communicator | ranks | all-reduce + sync p50 us | "
              "algbw GB/s | busbw GB/s |\n| --- | --- | --- | --- | --- | --- | --- |\n");
  int failed = device_group(1, iterations, true);
  if (ranks > 1 && gpus >= ranks)
    failed |= device_group(ranks, iterations, true);
  else if (ranks > 1)
    std::printf("| (NCCL at %d ranks needs %d GPUs, found %d) | | | | | | |\n", ranks, ranks, gpus);
  if (ranks > 1)
    failed |= device_group(ranks, iterations, false);
  return failed;
}
#endif

} // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--device") {
#ifdef TROUPE_WITH_CUDA
    return device_main(argc > 2 ? std::atoi(argv[2]) : 2, argc > 3 ? std::atoi(argv[3]) : 200);
#else
    std::printf("SKIP: built without CUDA\n");
    return 0;
#endif
  }
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
