// GPU KV between two processes of one host by CUDA IPC (label `gpu`): a forked "decode" process
// registers part of a cudaMalloc allocation with a socket transport in CUDA IPC mode and
// publishes its descriptor; a forked "prefill" process writes into it from host and GPU memory
// (many ranges: several segments; a second batch reuses the mapping) and the decode process
// checks every byte and each notice. cudaIpcOpenMemHandle refuses a handle from its own
// process, hence two processes; the parent never touches CUDA (a forked child could not use it).
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cluster/transfer/socket_transport.hpp"
#include "engine/backend/cuda/cuda_device.hpp"
#include "parallel/rank_processes.hpp"

using namespace troupe;
using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

constexpr size_t alloc_bytes = 1 << 20, region_offset = 4096, region_bytes = 512 << 10;
constexpr size_t host_bytes = 256 << 10, gpu_bytes = 64 << 10;
constexpr int scattered = 700; // 64-byte ranges, none contiguous: two segments with the others

uint8_t host_byte(size_t i) {
  return static_cast<uint8_t>(i * 13 + 5);
}
uint8_t gpu_byte(size_t i) {
  return static_cast<uint8_t>(i * 7 + 200);
}

// The batches' ranges: locals {host, gpu}, one remote region.
std::vector<write_range> first_ranges() {
  std::vector<write_range> r = {{0, 0, 0, 0, 1000}, {1, 100, 0, 2000, 5000}};
  for (int i = 0; i < scattered; ++i)
    r.push_back(
        {0, 4096 + static_cast<uint64_t>(i) * 128, 0, 100000 + static_cast<uint64_t>(i) * 96, 64});
  return r;
}
std::vector<write_range> second_ranges() {
  return {{1, 0, 0, region_bytes - gpu_bytes, gpu_bytes}};
}

// What the remote region holds after the batches in `batches` (zero elsewhere).
std::vector<uint8_t> expected_region(const std::vector<std::vector<write_range>>& batches) {
  std::vector<uint8_t> want(region_bytes, 0);
  for (const auto& b : batches)
    for (const auto& r : b)
      for (uint64_t k = 0; k < r.length; ++k)
        want[r.remote_offset + k] =
            r.local == 0 ? host_byte(r.local_offset + k) : gpu_byte(r.local_offset + k);
  return want;
}

int finish(const std::filesystem::path& dir, int rank, const std::string& text) {
  std::ofstream(dir / ("rank" + std::to_string(rank) + ".txt")) << text;
  return text.starts_with("ok") || text.starts_with("SKIP") ? 0 : 1;
}

std::string to_hex(const std::vector<uint8_t>& b) {
  std::string s;
  for (uint8_t v : b)
    s += fmt::format("{:02x}", v);
  return s;
}
std::vector<uint8_t> from_hex(const std::string& s) {
  std::vector<uint8_t> b;
  for (size_t i = 0; i + 1 < s.size(); i += 2)
    b.push_back(static_cast<uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16)));
  return b;
}

int decode_rank(const std::filesystem::path& dir) {
  auto publish = [&](const std::string& text) {
    std::ofstream(dir / "decode.tmp") << text;
    std::filesystem::rename(dir / "decode.tmp", dir / "decode.txt");
  };
  auto devices = engine::cuda_devices();
  if (!devices || devices->empty()) {
    const auto why = devices ? std::string("no CUDA device") : devices.error().to_string();
    publish("SKIP " + why);
    return finish(dir, 0, "SKIP: " + why);
  }
  auto t = socket_transport::create_with_cuda_ipc();
  if (!t) {
    publish("FAILED");
    return finish(dir, 0, "create_with_cuda_ipc: " + t.error().to_string());
  }
  char* mem = nullptr;
  if (cudaMalloc(&mem, alloc_bytes) != cudaSuccess ||
      cudaMemset(mem, 0, alloc_bytes) != cudaSuccess)
    return finish(dir, 0, "cudaMalloc/cudaMemset failed");
  auto id = (*t)->register_memory(mem + region_offset, region_bytes, memory_kind::cuda);
  if (!id)
    return finish(dir, 0, "register_memory: " + id.error().to_string());
  auto d = (*t)->describe(*id);
  if (!d || !d->ipc || d->ipc->offset != region_offset || d->ipc->host != this_host_id().value())
    return finish(dir, 0, "the descriptor has no IPC part at offset 4096 of this host");
  auto at = (*t)->listen(0);
  if (!at)
    return finish(dir, 0, "listen: " + at.error().to_string());
  publish(*at + " " + to_hex(d->serialize()));
  auto conn = (*t)->accept(clock::now() + 60s);
  if (!conn)
    return finish(dir, 0, "accept: " + conn.error().to_string());
  std::vector<std::vector<write_range>> landed;
  for (auto ranges : {first_ranges(), second_ranges()}) {
    auto n = (*conn)->wait_notice(clock::now() + 60s);
    uint64_t bytes = 0;
    for (const auto& r : ranges)
      bytes += r.length;
    if (!n || n->cancelled || n->lease_id != landed.size() + 1 || n->bytes != bytes)
      return finish(dir, 0,
                    fmt::format("notice {}: {}", landed.size() + 1,
                                n ? fmt::format("lease {} bytes {} (want {}) cancelled {}",
                                                n->lease_id, n->bytes, bytes, n->cancelled)
                                  : n.error().to_string()));
    landed.push_back(ranges);
    std::vector<uint8_t> got(region_bytes);
    if (cudaMemcpy(got.data(), mem + region_offset, region_bytes, cudaMemcpyDeviceToHost) !=
        cudaSuccess)
      return finish(dir, 0, "cudaMemcpy back failed");
    // After the last batch the whole region; before it only what the batches so far wrote (the
    // prefill side may be writing the next batch already).
    const auto want = expected_region(landed);
    std::vector<bool> check(region_bytes, landed.size() == 2);
    for (const auto& b : landed)
      for (const auto& r : b)
        std::fill_n(check.begin() + static_cast<std::ptrdiff_t>(r.remote_offset), r.length, true);
    for (size_t i = 0; i < region_bytes; ++i)
      if (check[i] && got[i] != want[i])
        return finish(dir, 0,
                      fmt::format("after batch {}: byte {} is {}, want {}", landed.size(), i,
                                  got[i], want[i]));
  }
  std::vector<uint8_t> before(region_offset);
  cudaMemcpy(before.data(), mem, region_offset, cudaMemcpyDeviceToHost);
  for (uint8_t v : before)
    if (v != 0)
      return finish(dir, 0, "bytes before the region were written");
  conn->reset();
  (void)(*t)->deregister(*id);
  cudaFree(mem);
  return finish(dir, 0, "ok");
}

int prefill_rank(const std::filesystem::path& dir) {
  std::string published;
  for (auto until = clock::now() + 60s; clock::now() < until && published.empty();) {
    std::ifstream f(dir / "decode.txt");
    std::getline(f, published);
    if (published.empty())
      std::this_thread::sleep_for(10ms);
  }
  if (published.starts_with("SKIP"))
    return finish(dir, 1, published);
  const auto space = published.find(' ');
  if (space == std::string::npos)
    return finish(dir, 1, "the decode process published nothing usable: " + published);
  auto remote = region_descriptor::parse(from_hex(published.substr(space + 1)));
  if (!remote)
    return finish(dir, 1, "descriptor: " + remote.error().to_string());
  auto t = socket_transport::create_with_cuda_ipc();
  if (!t)
    return finish(dir, 1, "create_with_cuda_ipc: " + t.error().to_string());
  std::vector<uint8_t> host(host_bytes), staged(gpu_bytes);
  for (size_t i = 0; i < host.size(); ++i)
    host[i] = host_byte(i);
  for (size_t i = 0; i < staged.size(); ++i)
    staged[i] = gpu_byte(i);
  char* gpu = nullptr;
  if (cudaMalloc(&gpu, gpu_bytes) != cudaSuccess ||
      cudaMemcpy(gpu, staged.data(), gpu_bytes, cudaMemcpyHostToDevice) != cudaSuccess)
    return finish(dir, 1, "cudaMalloc/cudaMemcpy failed");
  auto h = (*t)->register_memory(host.data(), host.size(), memory_kind::host);
  auto g = (*t)->register_memory(gpu, gpu_bytes, memory_kind::cuda);
  if (!h || !g)
    return finish(dir, 1, "register_memory failed");
  auto conn = (*t)->connect(published.substr(0, space), clock::now() + 30s);
  if (!conn)
    return finish(dir, 1, "connect: " + conn.error().to_string());
  uint64_t lease = 1;
  for (auto ranges : {first_ranges(), second_ranges()}) {
    write_batch batch{
        .lease_id = lease, .locals = {*h, *g}, .remotes = {*remote}, .ranges = ranges};
    auto id = (*conn)->post(batch);
    if (!id)
      return finish(dir, 1, "post: " + id.error().to_string());
    auto done = (*conn)->wait(*id);
    if (!done)
      return finish(dir, 1, "wait: " + done.error().to_string());
    // 702 writes: two segments of at most 512; the second batch is one.
    const uint64_t segments = lease == 1 ? 2 : 1;
    if (done->posted_writes != segments)
      return finish(
          dir, 1,
          fmt::format("lease {}: {} segments, want {}", lease, done->posted_writes, segments));
    ++lease;
  }
  conn->reset(); // closes the mapping
  (void)(*t)->deregister(*h);
  (void)(*t)->deregister(*g);
  cudaFree(gpu);
  return finish(dir, 1, "ok");
}

// Two ranks of one node process: the decode rank's handle is this process's own, which
// cudaIpcOpenMemHandle refuses; the writer copies to its address as it stands.
int same_process(const std::filesystem::path& dir) {
  auto devices = engine::cuda_devices();
  if (!devices || devices->empty())
    return finish(
        dir, 0, "SKIP: " + (devices ? std::string("no CUDA device") : devices.error().to_string()));
  auto a = socket_transport::create_with_cuda_ipc(), b = socket_transport::create_with_cuda_ipc();
  if (!a || !b)
    return finish(dir, 0, "create_with_cuda_ipc failed");
  char *mem = nullptr, *gpu = nullptr;
  std::vector<uint8_t> host(host_bytes), staged(gpu_bytes);
  for (size_t i = 0; i < host.size(); ++i)
    host[i] = host_byte(i);
  for (size_t i = 0; i < staged.size(); ++i)
    staged[i] = gpu_byte(i);
  if (cudaMalloc(&mem, alloc_bytes) != cudaSuccess ||
      cudaMemset(mem, 0, alloc_bytes) != cudaSuccess ||
      cudaMalloc(&gpu, gpu_bytes) != cudaSuccess ||
      cudaMemcpy(gpu, staged.data(), gpu_bytes, cudaMemcpyHostToDevice) != cudaSuccess)
    return finish(dir, 0, "cudaMalloc/cudaMemcpy failed");
  auto d = (*b)->register_memory(mem + region_offset, region_bytes, memory_kind::cuda);
  auto h = (*a)->register_memory(host.data(), host.size(), memory_kind::host);
  auto g = (*a)->register_memory(gpu, gpu_bytes, memory_kind::cuda);
  if (!d || !h || !g)
    return finish(dir, 0, "register_memory failed");
  if (!socket_transport::exported_here((*b)->describe(*d)->ipc->handle))
    return finish(dir, 0, "the decode region is not known as this process's own");
  auto at = (*b)->listen(0);
  if (!at)
    return finish(dir, 0, "listen: " + at.error().to_string());
  expected<std::unique_ptr<kv_connection>> in = make_error(errc::timeout, "not accepted");
  std::thread acceptor([&] { in = (*b)->accept(clock::now() + 30s); });
  auto out = (*a)->connect(*at, clock::now() + 30s);
  acceptor.join();
  if (!out || !in)
    return finish(dir, 0, "connect/accept failed");
  write_batch batch{.lease_id = 7,
                    .locals = {*h, *g},
                    .remotes = {*(*b)->describe(*d)},
                    .ranges = first_ranges()};
  auto id = (*out)->post(batch);
  if (!id)
    return finish(dir, 0, "post: " + id.error().to_string());
  auto done = (*out)->wait(*id);
  if (!done)
    return finish(dir, 0, "wait: " + done.error().to_string());
  auto n = (*in)->wait_notice(clock::now() + 30s);
  if (!n || n->lease_id != 7 || n->bytes != done->bytes)
    return finish(dir, 0, "no notice, or not this batch's");
  std::vector<uint8_t> got(region_bytes);
  cudaMemcpy(got.data(), mem + region_offset, region_bytes, cudaMemcpyDeviceToHost);
  if (got != expected_region({first_ranges()}))
    return finish(dir, 0, "the region does not hold what was written");
  out->reset();
  in->reset();
  (void)(*b)->deregister(*d);
  if (socket_transport::exported_here(batch.remotes[0].ipc->handle))
    return finish(dir, 0, "the handle is still known after deregistering");
  return finish(dir, 0, "ok");
}

} // namespace

TEST_CASE("gpu: CUDA IPC between two ranks of one process writes to the address as it stands") {
  auto outcome = test::run_ranks(
      1, [](int, const std::filesystem::path& d) { return same_process(d); }, 120s);
  if (outcome[0].message.starts_with("SKIP")) {
    MESSAGE(outcome[0].message);
    return;
  }
  CHECK_MESSAGE(outcome[0].exit_code == 0, outcome[0].message);
  CHECK(outcome[0].message == "ok");
}

TEST_CASE("gpu: CUDA IPC writes another process's GPU memory from host and GPU memory") {
  auto outcomes = test::run_ranks(
      2,
      [](int r, const std::filesystem::path& d) {
        return r == 0 ? decode_rank(d) : prefill_rank(d);
      },
      120s);
  if (outcomes[0].message.starts_with("SKIP")) {
    MESSAGE(outcomes[0].message);
    return;
  }
  CHECK_MESSAGE(outcomes[0].exit_code == 0, "decode: " << outcomes[0].message);
  CHECK_MESSAGE(outcomes[1].exit_code == 0, "prefill: " << outcomes[1].message);
  CHECK(outcomes[0].message == "ok");
  CHECK(outcomes[1].message == "ok");
}
