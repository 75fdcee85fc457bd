// KV transfer throughput (issue 17): the fabric transport (libfabric) and the socket transport
// against a plain TCP socket pair on the same loopback path, in the same run. Sizes 64 KiB … 1 GiB
// (one batch each, waited until the target's notice arrived) and the Qwen3-8B KV shape (2,048
// tokens, 144 KiB/token, 16-token blocks, 36 layers, one batch per layer, all posted back to back).
// Prints GB/s and the ratio to raw TCP.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cluster/transfer/fabric_transport.hpp"
#include "cluster/transfer/socket_transport.hpp"

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_since(clock::time_point t0) {
  return std::chrono::duration<double>(clock::now() - t0).count();
}

[[noreturn]] void die(const std::string& what) {
  fmt::print(stderr, "kv_transfer_bench: {}\n", what);
  std::exit(1);
}

// A connected loopback TCP pair: the bound every transport on this path is compared with.
struct tcp_pair {
  int tx = -1, rx = -1;
  tcp_pair() {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(l, (sockaddr*)&a, sizeof a) || listen(l, 1) || getsockname(l, (sockaddr*)&a, &len))
      die("raw tcp listen");
    tx = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(tx, (sockaddr*)&a, sizeof a))
      die("raw tcp connect");
    rx = accept(l, nullptr, nullptr);
    close(l);
    int one = 1;
    setsockopt(tx, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(rx, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~tcp_pair() {
    close(tx);
    close(rx);
  }
};

void send_all(int fd, const uint8_t* p, uint64_t n) {
  while (n > 0) {
    ssize_t k = ::send(fd, p, std::min<uint64_t>(n, 1 << 30), 0);
    if (k <= 0)
      die("raw tcp send");
    p += k;
    n -= static_cast<uint64_t>(k);
  }
}
void recv_all(int fd, uint8_t* p, uint64_t n) {
  while (n > 0) {
    ssize_t k = ::recv(fd, p, std::min<uint64_t>(n, 1 << 30), 0);
    if (k <= 0)
      die("raw tcp recv");
    p += k;
    n -= static_cast<uint64_t>(k);
  }
}

// `rounds` messages of `bytes` each, every one acknowledged by the receiver (as a notice is).
double raw_tcp_gbps(tcp_pair& s, const uint8_t* src, uint8_t* dst, uint64_t bytes, int rounds) {
  std::thread receiver([&] {
    uint8_t ack = 1;
    for (int r = 0; r < rounds; ++r) {
      recv_all(s.rx, dst, bytes);
      send_all(s.rx, &ack, 1);
    }
  });
  auto t0 = clock::now();
  uint8_t ack = 0;
  for (int r = 0; r < rounds; ++r) {
    send_all(s.tx, src, bytes);
    recv_all(s.tx, &ack, 1);
  }
  double t = seconds_since(t0);
  receiver.join();
  return double(bytes) * rounds / t / 1e9;
}

// Two ends of one transport kind; the bench writes from a's registration into b's.
struct endpoint_pair {
  std::shared_ptr<kv_transport> a, b;
  std::unique_ptr<kv_connection> ab, ba;
  region_id src = 0;
  region_descriptor remote;
};

template <class T>
void accept_connect(endpoint_pair& p, T& a, T& b) {
  auto address = b.listen(0);
  if (!address)
    die(address.error().to_string());
  std::thread acceptor([&] {
    auto c = b.accept(clock::now() + 10s);
    if (!c)
      die(c.error().to_string());
    p.ba = std::move(*c);
  });
  auto c = a.connect(*address, clock::now() + 10s);
  acceptor.join();
  if (!c)
    die(c.error().to_string());
  p.ab = std::move(*c);
}

void register_pair(endpoint_pair& p, uint8_t* src, uint8_t* dst, uint64_t bytes) {
  auto s = p.a->register_memory(src, bytes, memory_kind::host);
  auto d = p.b->register_memory(dst, bytes, memory_kind::host);
  if (!s || !d)
    die((!s ? s.error() : d.error()).to_string());
  p.src = *s;
  p.remote = *p.b->describe(*d);
}

endpoint_pair connect_fabric(const std::string& provider, std::string& choice) {
  auto a = fabric_transport::open({.provider = provider});
  auto b = fabric_transport::open({.provider = provider});
  if (!a || !b)
    die((!a ? a.error() : b.error()).to_string());
  choice = fmt::format("{}; tx depth {}; max write {} B", (*a)->choice(), (*a)->tx_depth(),
                       (*a)->max_write());
  endpoint_pair p;
  accept_connect(p, **a, **b);
  p.a = std::move(*a);
  p.b = std::move(*b);
  return p;
}

endpoint_pair connect_socket() {
  auto a = socket_transport::create(), b = socket_transport::create();
  endpoint_pair p;
  accept_connect(p, *a, *b);
  p.a = a;
  p.b = b;
  return p;
}

// Posts every batch back to back, then waits for each and for the target's notices.
double run_batches(endpoint_pair& p, std::vector<write_batch> batches, uint64_t* posted_writes) {
  auto t0 = clock::now();
  uint64_t bytes = 0;
  std::vector<transfer_id> ids;
  for (write_batch& b : batches) {
    b.deadline = clock::now() + 120s;
    auto id = p.ab->post(std::move(b));
    if (!id)
      die(id.error().to_string());
    ids.push_back(*id);
  }
  for (transfer_id id : ids) {
    auto r = p.ab->wait(id);
    if (!r)
      die(r.error().to_string());
    *posted_writes += r->posted_writes;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    auto n = p.ba->wait_notice(clock::now() + 120s);
    if (!n || n->cancelled)
      die(n ? "cancelled notice" : n.error().to_string());
    bytes += n->bytes;
  }
  return double(bytes) / seconds_since(t0) / 1e9;
}

// One size: `rounds` single-range batches, each waited until its notice, like the raw TCP sender.
double size_gbps(endpoint_pair& p, uint64_t size, int rounds) {
  uint64_t writes = 0;
  double seconds = 0;
  for (int r = 0; r < rounds; ++r) {
    write_batch b{.lease_id = uint64_t(r), .locals = {p.src}, .remotes = {p.remote}};
    b.ranges = {{0, 0, 0, 0, size}};
    std::vector<write_batch> one;
    one.push_back(std::move(b));
    seconds += double(size) / (run_batches(p, std::move(one), &writes) * 1e9);
  }
  return double(size) * rounds / seconds / 1e9;
}

// Qwen3-8B: 36 layers × 8 KV heads × 128 dims × 2 (K, V) × 2 bytes = 144 KiB per token, 4 KiB per
// layer; a 16-token block is 64 KiB per layer. 2,048 tokens = 128 blocks per layer, 288 MiB in all.
constexpr uint64_t kv_layers = 36, kv_block_bytes = 16 * 4096, kv_blocks = 128,
                   kv_pool_blocks = 256;

std::vector<write_batch> kv_batches(const endpoint_pair& p, const std::vector<uint64_t>& from,
                                    const std::vector<uint64_t>& to) {
  std::vector<write_batch> batches;
  for (uint64_t l = 0; l < kv_layers; ++l) {
    write_batch b{.lease_id = l, .locals = {p.src}, .remotes = {p.remote}};
    for (uint64_t i = 0; i < kv_blocks; ++i)
      b.ranges.push_back({0, (l * kv_pool_blocks + from[i]) * kv_block_bytes, 0,
                          (l * kv_pool_blocks + to[i]) * kv_block_bytes, kv_block_bytes});
    batches.push_back(std::move(b));
  }
  return batches;
}

// Everything one run compares: the three paths and the buffers they share.
struct bench_paths {
  endpoint_pair fabric, sock;
  tcp_pair raw;
  uint8_t* src = nullptr;
  uint8_t* dst = nullptr;
};

// This VM's 2 cores are shared with other jobs: the three paths take turns in `trials` short
// trials and each prints its median, so a burst of outside load hits them alike.
void bench_sizes(bench_paths& b, uint64_t max_size, int trials) {
  fmt::print(
      "\nmedian of {} interleaved trials per size\n{:>10} {:>6} {:>9} {:>9} {:>9} {:>7} {:>7}\n",
      trials, "size", "rounds", "raw GB/s", "fabric", "socket", "fab/raw", "sock/raw");
  for (uint64_t size = 64 << 10; size <= max_size; size *= 4) {
    int rounds = static_cast<int>(std::clamp<uint64_t>((uint64_t{256} << 20) / size, 1, 200));
    std::vector<double> r, f, k;
    for (int t = 0; t < trials; ++t) {
      r.push_back(raw_tcp_gbps(b.raw, b.src, b.dst, size, rounds));
      f.push_back(size_gbps(b.fabric, size, rounds));
      k.push_back(size_gbps(b.sock, size, rounds));
    }
    double raw_gbps = median(r), fab = median(f), soc = median(k);
    fmt::print("{:>10} {:>6} {:>9.2f} {:>9.2f} {:>9.2f} {:>6.0f}% {:>6.0f}%\n", size, rounds,
               raw_gbps, fab, soc, 100 * fab / raw_gbps, 100 * soc / raw_gbps);
  }
}

void bench_kv(bench_paths& b, int kv_rounds) {
  std::mt19937_64 rng(17);
  auto pick = [&](bool contiguous) {
    std::vector<uint64_t> ids(kv_pool_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    if (!contiguous)
      std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(kv_blocks);
    return ids;
  };
  fmt::print("\nQwen3-8B KV, 2,048 tokens (288 MiB): 36 per-layer batches of 128 x 64 KiB blocks, "
             "posted back to back, median of {} rounds\n",
             kv_rounds);
  fmt::print("{:>20} {:>9} {:>9} {:>9} {:>7} {:>7} {:>13}\n", "block ids", "raw GB/s", "fabric",
             "socket", "fab/raw", "sock/raw", "writes f/s");
  for (bool contiguous : {false, true}) {
    std::vector<double> r, f, k;
    uint64_t fab_writes = 0, soc_writes = 0;
    for (int round = 0; round < kv_rounds; ++round) {
      auto from = pick(contiguous), to = pick(contiguous);
      r.push_back(raw_tcp_gbps(b.raw, b.src, b.dst, kv_layers * kv_blocks * kv_block_bytes, 1));
      f.push_back(run_batches(b.fabric, kv_batches(b.fabric, from, to), &fab_writes));
      k.push_back(run_batches(b.sock, kv_batches(b.sock, from, to), &soc_writes));
    }
    double raw_gbps = median(r), fab = median(f), soc = median(k);
    fmt::print("{:>20} {:>9.2f} {:>9.2f} {:>9.2f} {:>6.0f}% {:>6.0f}% {:>6}/{:<6}\n",
               contiguous ? "contiguous" : "scattered (random)", raw_gbps, fab, soc,
               100 * fab / raw_gbps, 100 * soc / raw_gbps, fab_writes / kv_rounds,
               soc_writes / kv_rounds);
  }
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"KV transfer throughput: fabric and socket transports vs raw TCP on loopback"};
  std::string provider = "tcp";
  uint64_t max_size = uint64_t{1} << 30;
  int kv_rounds = 7, trials = 5;
  app.add_option("--provider", provider, "libfabric provider: auto, verbs, efa, tcp")
      ->capture_default_str();
  app.add_option("--max-size", max_size,
                 "largest transfer size in bytes (>= 576 MiB for the KV pool)")
      ->capture_default_str();
  app.add_option("--trials", trials, "interleaved trials per size (median printed)")
      ->capture_default_str();
  app.add_option("--kv-rounds", kv_rounds, "repetitions of the 36-layer KV transfer")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (kv_layers * kv_pool_blocks * kv_block_bytes > max_size)
    die("--max-size too small for the KV pool (576 MiB)");

  std::string choice;
  bench_paths b{connect_fabric(provider, choice), connect_socket()};
  fmt::print("fabric provider: {}\n", choice);
  auto src = std::make_unique<uint8_t[]>(max_size);
  auto dst = std::make_unique<uint8_t[]>(max_size);
  std::memset(src.get(), 7, max_size);
  std::memset(dst.get(), 0, max_size);
  b.src = src.get();
  b.dst = dst.get();
  register_pair(b.fabric, b.src, b.dst, max_size);
  register_pair(b.sock, b.src, b.dst, max_size);
  bench_sizes(b, max_size, trials);
  bench_kv(b, kv_rounds);
  return 0;
}
