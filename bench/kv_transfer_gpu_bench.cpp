// GPU KV over a transport that registers host memory only (design.md §6), as serving moves it
// between node processes: one request of the Qwen3-8B KV shape (2,048 tokens, 36 layers, 8 kv
// heads x 128 bf16, 16-token blocks, scattered block tables on both sides) staged out of a device
// pool into page-locked host memory (stage_batch + copy_all), written as one batch over the
// provider on loopback into the decode side's landing area, and copied into a second device pool
// (unstage_copies + copy_all). Each phase is timed and printed against the pinned cudaMemcpy
// bandwidth of the same run; then the same request as a prefill rank posts it (post_staged: chunks
// copied out while the one before is on the wire). The moved blocks are checked. Exit 77 without
// a GPU.
// Usage: kv_transfer_gpu_bench [PROVIDER (tcp, socket, ...; default tcp)]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "actors/serving/kv_net.hpp"
#include "cluster/transfer/kv_handoff.hpp"
#include "cluster/transfer/staging.hpp"

using namespace troupe;
using namespace troupe::cluster::transfer;
using namespace std::chrono_literals;

namespace {

constexpr int32_t layers = 36, heads = 8, dim = 128, block_size = 16, pool_blocks = 256;
constexpr int32_t tokens = 2048;

#define CHECK_CUDA(call)                                                                           \
  do {                                                                                             \
    if (cudaError_t rc_ = (call); rc_ != cudaSuccess) {                                            \
      fmt::print(stderr, "{}: {}\n", #call, cudaGetErrorString(rc_));                              \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

template <class T>
T ok_or_exit(expected<T> v, const char* what) {
  if (!v) {
    fmt::print(stderr, "{}: {}\n", what, v.error().to_string());
    std::exit(1);
  }
  return std::move(*v);
}

void ok_or_exit(expected<void> v, const char* what) {
  if (!v) {
    fmt::print(stderr, "{}: {}\n", what, v.error().to_string());
    std::exit(1);
  }
}

double seconds_since(clock::time_point t0) {
  return std::chrono::duration<double>(clock::now() - t0).count();
}

double copy_gbps(void* dst, const void* src, uint64_t n, cudaMemcpyKind kind) {
  CHECK_CUDA(cudaMemcpy(dst, src, n, kind)); // warm
  auto t0 = clock::now();
  for (int i = 0; i < 3; ++i)
    CHECK_CUDA(cudaMemcpy(dst, src, n, kind));
  return 3.0 * double(n) / seconds_since(t0) / 1e9;
}

// One rank's device pool: every layer's K and V plane in one allocation, as the CUDA backend.
engine::kv_layout device_layout(char* base) {
  engine::kv_layout l{.dtype = "bfloat16",
                      .elem_bytes = 2,
                      .num_layers = layers,
                      .layer_begin = 0,
                      .layer_end = layers,
                      .num_kv_heads = heads,
                      .head_begin = 0,
                      .head_end = heads,
                      .head_dim = dim,
                      .block_size = block_size,
                      .num_blocks = pool_blocks};
  const uint64_t plane = uint64_t(pool_blocks) * block_size * l.token_bytes();
  l.allocations = {{.base = base, .bytes = plane * layers * 2, .on_gpu = true}};
  for (int32_t i = 0; i < layers * 2; ++i)
    l.planes.push_back({.allocation = 0, .offset = plane * uint64_t(i)});
  return l;
}

std::vector<int32_t> scattered(std::mt19937_64& rng, size_t n, int32_t pool) {
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(n);
  return ids;
}

} // namespace

int main(int argc, char** argv) {
  const std::string provider = argc > 1 ? argv[1] : "tcp";
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    fmt::print("SKIP: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  char *src_pool = nullptr, *dst_pool = nullptr;
  const auto P = device_layout(nullptr);
  const uint64_t pool = P.allocations[0].bytes;
  CHECK_CUDA(cudaMalloc(&src_pool, pool));
  CHECK_CUDA(cudaMalloc(&dst_pool, pool));
  const auto src = device_layout(src_pool), dst = device_layout(dst_pool);
  std::vector<uint8_t> pattern(pool);
  for (uint64_t i = 0; i < pool; ++i)
    pattern[i] = uint8_t((i >> 12) * 31 + i);
  CHECK_CUDA(cudaMemcpy(src_pool, pattern.data(), pool, cudaMemcpyHostToDevice));

  const int32_t blocks = tokens / block_size;
  const auto landing = landing_layout(dst, blocks);
  const uint64_t moved = landing.allocations[0].bytes;
  auto out_buf = ok_or_exit(staging_buffer::allocate(moved, true), "staging buffer");
  auto land_buf = ok_or_exit(staging_buffer::allocate(moved, true), "landing buffer");
  const double d2h = copy_gbps(out_buf.data(), src_pool, moved, cudaMemcpyDeviceToHost);
  const double h2d = copy_gbps(dst_pool, land_buf.data(), moved, cudaMemcpyHostToDevice);
  CHECK_CUDA(cudaMemset(dst_pool, 0, pool));

  auto a = ok_or_exit(serve::open_net_transport(provider, "127.0.0.1"), "prefill transport");
  auto b = ok_or_exit(serve::open_net_transport(provider, "127.0.0.1"), "decode transport");
  const auto address = ok_or_exit(b.listen(0), "listen");
  std::unique_ptr<kv_connection> ab, ba;
  std::thread acceptor([&] { ba = ok_or_exit(b.accept(clock::now() + 10s), "accept"); });
  ab = ok_or_exit(a.connect(address, clock::now() + 10s), "connect");
  acceptor.join();
  const auto out_id = ok_or_exit(
      a.transport->register_memory(out_buf.data(), out_buf.size(), memory_kind::pinned_host),
      "register");
  const auto land_id = ok_or_exit(
      b.transport->register_memory(land_buf.data(), land_buf.size(), memory_kind::pinned_host),
      "register");
  const auto remote = ok_or_exit(b.transport->describe(land_id), "describe");
  auto plan = ok_or_exit(kv_handoff_plan::make({P}, {landing}), "plan");

  fmt::print("{}: Qwen3-8B KV, {} tokens ({} MiB; {} layers x {} scattered blocks of {} tokens "
             "per side), provider {}\n",
             prop.name, tokens, moved >> 20, layers, blocks, block_size, a.transport->name());
  fmt::print("pinned cudaMemcpy of {} MiB: D2H {:.2f} GB/s, H2D {:.2f} GB/s\n", moved >> 20, d2h,
             h2d);
  std::mt19937_64 rng(17);
  int failures = 0;
  for (int round = 0; round < 3; ++round) {
    const auto pb = scattered(rng, blocks, pool_blocks), db = scattered(rng, blocks, pool_blocks);
    auto lb = scattered(rng, blocks, blocks);
    write_batch batch{.lease_id = uint64_t(round) + 1,
                      .locals = {},
                      .remotes = {remote},
                      .ranges = {},
                      .deadline = clock::now() + 60s};
    auto t0 = clock::now();
    ok_or_exit(plan.ranges(0, pb, lb, 0, tokens, batch.ranges), "ranges");
    std::vector<engine::copy_span> out_copies, in_copies;
    stage_batch(batch, src.allocations, out_buf.data(), out_id, 0, out_copies);
    ok_or_exit(copy_all(out_copies, true), "copy-out");
    const double t_out = seconds_since(t0);
    auto t1 = clock::now();
    const auto id = ok_or_exit(ab->post(std::move(batch)), "post");
    const auto done = ok_or_exit(ab->wait(id), "wait");
    const auto notice = ok_or_exit(ba->wait_notice(clock::now() + 60s), "notice");
    const double t_net = seconds_since(t1);
    auto t2 = clock::now();
    ok_or_exit(unstage_copies(landing, land_buf.data(), dst, lb, db, 0, tokens, in_copies),
               "unstage");
    ok_or_exit(copy_all(in_copies, true), "copy-in");
    const double t_in = seconds_since(t2), total = seconds_since(t0);
    // The moved blocks: every (layer, K/V) plane's block pb[i] arrived at db[i].
    auto wrong_blocks = [&] {
      std::vector<uint8_t> got(pool);
      CHECK_CUDA(cudaMemcpy(got.data(), dst_pool, pool, cudaMemcpyDeviceToHost));
      const uint64_t bb = uint64_t(block_size) * P.token_bytes();
      uint64_t bad = 0;
      for (int32_t plane = 0; plane < layers * 2; ++plane)
        for (int32_t i = 0; i < blocks; ++i) {
          const uint64_t base = P.planes[size_t(plane)].offset;
          bad += std::memcmp(&got[base + uint64_t(db[size_t(i)]) * bb],
                             &pattern[base + uint64_t(pb[size_t(i)]) * bb], bb) != 0;
        }
      CHECK_CUDA(cudaMemset(dst_pool, 0, pool));
      return bad;
    };
    const uint64_t bad = wrong_blocks();
    failures += bad != 0 || notice.bytes != moved || done.bytes != moved;
    auto gbps = [&](double s) { return double(moved) / s / 1e9; };
    fmt::print("round {}: copy-out {:.2f} GB/s ({} copies, {:.0f}% of D2H) | {} {:.2f} GB/s ({} "
               "writes) | copy-in {:.2f} GB/s ({} copies, {:.0f}% of H2D) | end to end {:.1f} ms "
               "= {:.2f} GB/s; {} of {} blocks wrong\n",
               round, gbps(t_out), out_copies.size(), 100 * gbps(t_out) / d2h, a.transport->name(),
               gbps(t_net), done.posted_writes, gbps(t_in), in_copies.size(),
               100 * gbps(t_in) / h2d, total * 1e3, gbps(total), bad, layers * 2 * blocks);
    // As a prefill rank posts it: copied out and sent in 16 MiB chunks, a chunk's copy running
    // while the one before it is on the wire (post_staged), then copied in.
    write_batch whole{.lease_id = uint64_t(round) + 100,
                      .locals = {},
                      .remotes = {remote},
                      .ranges = {},
                      .deadline = clock::now() + 60s};
    ok_or_exit(plan.ranges(0, pb, lb, 0, tokens, whole.ranges), "ranges");
    t0 = clock::now();
    auto staged = ok_or_exit(post_staged(*ab, whole,
                                         {.at = out_buf.data(),
                                          .staged = out_id,
                                          .offset = 0,
                                          .sources = src.allocations,
                                          .device = true},
                                         16ull << 20, [] { return false; }),
                             "post_staged");
    const auto last = ok_or_exit(ab->wait(staged.last), "wait");
    ok_or_exit(ba->wait_notice(clock::now() + 60s), "notice");
    in_copies.clear();
    ok_or_exit(unstage_copies(landing, land_buf.data(), dst, lb, db, 0, tokens, in_copies),
               "unstage");
    ok_or_exit(copy_all(in_copies, true), "copy-in");
    const double pipelined = seconds_since(t0);
    const uint64_t bad2 = wrong_blocks();
    failures += bad2 != 0 || staged.silent.bytes + last.bytes != moved;
    fmt::print(
        "round {}: chunked copy-out overlapping the writes, then copy-in: {:.1f} ms = {:.2f} "
        "GB/s (the phases one after the other: {:.1f} ms); {} blocks wrong\n",
        round, pipelined * 1e3, gbps(pipelined), total * 1e3, bad2);
  }
  (void)a.transport->deregister(out_id);
  (void)b.transport->deregister(land_id);
  return failures == 0 ? 0 : 1;
}
