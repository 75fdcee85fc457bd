// KV transfer throughput (issue 17): the fabric transport against a plain TCP socket on the same
// loopback path, in the same run. Sizes 64 KiB … 1 GiB (one batch each, waited until the target's
// notice arrived) and the Qwen3-8B KV shape (2,048 tokens, 144 KiB/token, 16-token blocks, 36
// layers, one batch per layer, all posted back to back). Prints GB/s and the ratio to raw TCP.
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

using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

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

struct fabric_pair {
  std::unique_ptr<fabric_transport> a, b;
  std::unique_ptr<kv_connection> ab, ba;
};

fabric_pair connect_fabric(const std::string& provider) {
  fabric_pair p;
  auto a = fabric_transport::open({.provider = provider});
  auto b = fabric_transport::open({.provider = provider});
  if (!a || !b)
    die((!a ? a.error() : b.error()).to_string());
  p.a = std::move(*a);
  p.b = std::move(*b);
  auto address = p.b->listen(0);
  if (!address)
    die(address.error().to_string());
  std::thread acceptor([&] {
    auto c = p.b->accept(clock::now() + 10s);
    if (!c)
      die(c.error().to_string());
    p.ba = std::move(*c);
  });
  auto c = p.a->connect(*address, clock::now() + 10s);
  acceptor.join();
  if (!c)
    die(c.error().to_string());
  p.ab = std::move(*c);
  return p;
}

// Posts every batch back to back, then waits for each and for the target's notices.
double run_batches(fabric_pair& p, std::vector<write_batch> batches, uint64_t* posted_writes) {
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

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"KV transfer throughput: fabric transport vs raw TCP on loopback"};
  std::string provider = "tcp";
  uint64_t max_size = uint64_t{1} << 30;
  int kv_rounds = 3;
  app.add_option("--provider", provider, "auto, verbs, efa, tcp")->capture_default_str();
  app.add_option("--max-size", max_size, "largest transfer size in bytes")->capture_default_str();
  app.add_option("--kv-rounds", kv_rounds, "repetitions of the 36-layer KV transfer")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  fabric_pair p = connect_fabric(provider);
  tcp_pair raw;
  fmt::print("provider: {}; tx depth {}; max write {} B\n", p.a->choice(), p.a->tx_depth(),
             p.a->max_write());
  auto src = std::make_unique<uint8_t[]>(max_size);
  auto dst = std::make_unique<uint8_t[]>(max_size);
  std::memset(src.get(), 7, max_size);
  std::memset(dst.get(), 0, max_size);
  auto s = p.a->register_memory(src.get(), max_size, memory_kind::host);
  auto d = p.b->register_memory(dst.get(), max_size, memory_kind::host);
  if (!s || !d)
    die((!s ? s.error() : d.error()).to_string());
  region_descriptor remote = *p.b->describe(*d);

  fmt::print("\n{:>10} {:>7} {:>12} {:>12} {:>8}\n", "size", "rounds", "fabric GB/s",
             "raw tcp GB/s", "ratio");
  for (uint64_t size = 64 << 10; size <= max_size; size *= 4) {
    int rounds = static_cast<int>(std::clamp<uint64_t>((uint64_t{2} << 30) / size, 2, 2000));
    double raw_gbps = raw_tcp_gbps(raw, src.get(), dst.get(), size, rounds);
    uint64_t writes = 0;
    double fab = 0;
    for (int r = 0; r < rounds; ++r) { // one batch at a time, like the raw TCP sender
      write_batch b{.lease_id = uint64_t(r), .locals = {*s}, .remotes = {remote}};
      b.ranges = {{0, 0, 0, 0, size}};
      std::vector<write_batch> one;
      one.push_back(std::move(b));
      fab += double(size) / (run_batches(p, std::move(one), &writes) * 1e9);
    }
    double fab_gbps = double(size) * rounds / fab / 1e9;
    fmt::print("{:>10} {:>7} {:>12.2f} {:>12.2f} {:>7.0f}%\n", size, rounds, fab_gbps, raw_gbps,
               100 * fab_gbps / raw_gbps);
  }

  // Qwen3-8B: 36 layers × 8 KV heads × 128 dims × 2 (K, V) × 2 bytes = 144 KiB per token, 4 KiB per
  // layer; a 16-token block is 64 KiB per layer. 2,048 tokens = 128 blocks per layer, 288 MiB in
  // all.
  constexpr uint64_t layers = 36, block_bytes = 16 * 4096, blocks = 128, pool_blocks = 256;
  if (layers * pool_blocks * block_bytes > max_size)
    die("--max-size too small for the KV pool (576 MiB)");
  std::mt19937_64 rng(17);
  auto pick = [&](bool contiguous) {
    std::vector<uint64_t> ids(pool_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    if (!contiguous)
      std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(blocks);
    return ids;
  };
  fmt::print(
      "\nQwen3-8B KV, 2,048 tokens (288 MiB), 36 per-layer batches of 128 × 64 KiB blocks\n");
  fmt::print("{:>22} {:>12} {:>12} {:>8} {:>10}\n", "block ids", "fabric GB/s", "raw tcp GB/s",
             "ratio", "writes");
  for (bool contiguous : {false, true}) {
    double fab = 0, raw_gbps = 0;
    uint64_t writes = 0;
    for (int round = 0; round < kv_rounds; ++round) {
      auto from = pick(contiguous), to = pick(contiguous);
      std::vector<write_batch> batches;
      for (uint64_t l = 0; l < layers; ++l) {
        write_batch b{.lease_id = l, .locals = {*s}, .remotes = {remote}};
        for (uint64_t i = 0; i < blocks; ++i)
          b.ranges.push_back({0, (l * pool_blocks + from[i]) * block_bytes, 0,
                              (l * pool_blocks + to[i]) * block_bytes, block_bytes});
        batches.push_back(std::move(b));
      }
      fab += run_batches(p, std::move(batches), &writes) / kv_rounds;
      raw_gbps +=
          raw_tcp_gbps(raw, src.get(), dst.get(), layers * blocks * block_bytes, 1) / kv_rounds;
    }
    fmt::print("{:>22} {:>12.2f} {:>12.2f} {:>7.0f}% {:>10}\n",
               contiguous ? "contiguous" : "scattered (random)", fab, raw_gbps,
               100 * fab / raw_gbps, writes / kv_rounds);
  }
  return 0;
}
