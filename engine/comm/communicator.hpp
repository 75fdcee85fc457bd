// Collective and point-to-point communication between the ranks of one model-parallel group:
// the interface the sharded backends call (all-reduce after o_proj/down_proj, all-gather of
// vocab-parallel logits, send/recv of hidden states between pipeline stages, all-to-all of MoE
// token rows between expert ranks). Implementations:
// single-rank (tensor=1), Gloo over TCP (CPU ranks), NCCL later on GPUs. Every call blocks the
// calling thread until the operation completes on this rank; a dead peer ends in an error after
// the communicator's timeout, never a hang.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine::comm {

class communicator {
 public:
  virtual ~communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[n] on every rank becomes the elementwise sum over ranks (in place).
  virtual expected<void> all_reduce_sum(std::span<float> data) = 0;
  // out[size * n] = concatenation of every rank's in[n], in rank order.
  virtual expected<void> all_gather(std::span<const float> in, std::span<float> out) = 0;
  // data[n] on every rank becomes root's data[n].
  virtual expected<void> broadcast(std::span<float> data, int root) = 0;
  // Personalised exchange: `send` holds, in rank order, send_counts[r] floats for each rank r;
  // `recv` receives recv_counts[r] floats from each rank r, in rank order. Both count lists
  // have size() entries and must agree across ranks (rank a's send_counts[b] is rank b's
  // recv_counts[a]); zero counts are allowed.
  virtual expected<void> all_to_all(std::span<const float> send,
                                    std::span<const int64_t> send_counts, std::span<float> recv,
                                    std::span<const int64_t> recv_counts) = 0;
  // Point to point; `tag` tells apart messages between the same pair of ranks.
  virtual expected<void> send(std::span<const float> data, int to, uint32_t tag) = 0;
  virtual expected<void> recv(std::span<float> data, int from, uint32_t tag) = 0;
  virtual expected<void> barrier() = 0;
};

// The floats an all_to_all sends and receives in all (the sums of its counts), after checking
// that each count list has `size` entries, none negative.
expected<std::pair<int64_t, int64_t>> all_to_all_totals(int size,
                                                        std::span<const int64_t> send_counts,
                                                        std::span<const int64_t> recv_counts);
// The same, and that the buffers hold exactly what the counts add up to.
expected<void> check_all_to_all(int size, size_t send_floats, std::span<const int64_t> send_counts,
                                size_t recv_floats, std::span<const int64_t> recv_counts);

// The communicator of a group of one: collectives are copies, send/recv are errors.
std::unique_ptr<communicator> make_single_rank_communicator();

// Where ranks publish and find each other's addresses during rendezvous: the head's KV store
// across nodes (actors/head_rendezvous_store.hpp, kv_set/kv_wait requests to head_actor), or a
// folder shared by the ranks (make_folder_store, tests and single-host runs).
class rendezvous_store {
 public:
  virtual ~rendezvous_store() = default;
  virtual expected<void> set(const std::string& key, const std::vector<char>& value) = 0;
  // Blocks until `key` exists (or timeout), then returns its value.
  virtual expected<std::vector<char>> get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
  // Blocks until every key exists, or fails with errc::timeout naming the first missing one.
  virtual expected<void> wait(const std::vector<std::string>& keys,
                              std::chrono::milliseconds timeout) = 0;
};

// A store in a folder shared by the ranks (one file per key, written atomically by rename).
std::unique_ptr<rendezvous_store> make_folder_store(std::string folder);

struct gloo_options {
  std::string hostname = "127.0.0.1"; // address this rank listens on (loopback for tests)
  std::string interface;              // or a network interface name, e.g. "eth0" (wins if set)
  std::string prefix = "troupe";      // key prefix: one per group sharing a store
  std::chrono::milliseconds timeout{30000};
};

// Joins a Gloo group of `size` ranks through `store` (blocks until every rank has joined).
expected<std::unique_ptr<communicator>>
make_gloo_communicator(rendezvous_store& store, int rank, int size, const gloo_options& options);

} // namespace troupe::engine::comm
