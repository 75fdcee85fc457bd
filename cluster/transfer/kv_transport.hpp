// The KV transfer interface (design.md §6): register memory, describe it to a peer, and push
// batches of one-sided WRITEs with one completion notice per batch. Implemented by fabric_transport
// (libfabric) and local_transport (same process); prefill/decode disaggregation is the caller.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::cluster::transfer {

using clock = std::chrono::steady_clock;

enum class memory_kind : uint8_t { host = 0, pinned_host = 1, cuda = 2 };
std::string_view to_string(memory_kind kind);

// Which host a process runs on: the kernel's boot id (/proc/sys/kernel/random/boot_id), shared by
// every process of one running kernel (hence able to use CUDA IPC between them), new at each boot.
using host_id = std::array<uint8_t, 16>;
expected<host_id> this_host_id();
// The boot id's text form (36 characters, "8-4-4-4-12" hex digits).
expected<host_id> parse_host_id(std::string_view text);
std::string to_string(const host_id& host);

// A CUDA registration that another process of the same host can map (CUDA IPC): the allocation's
// handle, where the region starts in it, its device (the registrant's numbering) and the host.
struct cuda_ipc_part {
  std::array<uint8_t, 64> handle{};
  uint64_t offset = 0;
  int32_t device = 0;
  host_id host{};
  friend bool operator==(const cuda_ipc_part&, const cuda_ipc_part&) = default;
};

// What a peer needs to write into one registration; travels as bytes (serialize/parse) through the
// head's KV store or any other channel. `addr` is the registrant's virtual address
// (FI_MR_VIRT_ADDR).
struct region_descriptor {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint64_t key = 0; // provider key (FI_MR_PROV_KEY); 0 for the local transport
  memory_kind kind = memory_kind::host;
  std::optional<cuda_ipc_part> ipc; // CUDA memory a writer of this host maps (socket transport)

  // Little-endian, versioned: 32 bytes ("TKV1"), or 128 with the IPC part ("TKV2", cuda only).
  std::vector<uint8_t> serialize() const;
  static expected<region_descriptor> parse(std::span<const uint8_t> bytes);
  friend bool operator==(const region_descriptor&, const region_descriptor&) = default;
};

// Where a peer connects: the transport ("socket", or a libfabric provider: "verbs", "efa", "tcp")
// and its listener's host:port. Published in the head's KV store when a deployment loads; travels
// as text, "verbs@10.0.0.2:7000".
struct endpoint_address {
  std::string transport;
  std::string address;

  std::string serialize() const { return transport + "@" + address; }
  static expected<endpoint_address> parse(std::string_view text);
  friend bool operator==(const endpoint_address&, const endpoint_address&) = default;
};

using region_id = uint32_t;

// One (local range -> remote range) pair; `local` indexes write_batch::locals, `remote` ::remotes.
struct write_range {
  uint32_t local = 0;
  uint64_t local_offset = 0;
  uint32_t remote = 0;
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

// A transfer: many ranges, one lease, one deadline, one completion notice on the target side.
struct write_batch {
  uint64_t lease_id = 0;
  std::vector<region_id> locals;
  std::vector<region_descriptor> remotes;
  std::vector<write_range> ranges;
  clock::time_point deadline = clock::now() + std::chrono::seconds(30);
  // false: no notice (not even a cancelled one). A transfer posted as several batches on one
  // connection notifies with its last, posted once the others completed (wait()).
  bool notify = true;
};

// The target side's view of one finished batch. `cancelled` notices release the target's blocks.
struct transfer_notice {
  uint64_t lease_id = 0;
  uint64_t bytes = 0;
  bool cancelled = false;
};

// What the initiator learns when a batch finished: bytes written and how many writes were posted.
struct transfer_result {
  uint64_t bytes = 0;
  uint64_t posted_writes = 0;
};

using transfer_id = uint64_t;

// One connected peer. Thread-safe; post/cancel never block, wait/wait_notice block the calling
// thread at most until the batch's (or the given) deadline.
class kv_connection {
 public:
  virtual ~kv_connection() = default;
  // Validates every range against its registration (bounds, indices) before anything is posted.
  virtual expected<transfer_id> post(write_batch batch) = 0;
  // Blocks until the batch completed and its notice was sent, or failed (timeout, cancelled, peer
  // lost). After it returns, the provider no longer touches the batch's local buffers.
  virtual expected<transfer_result> wait(transfer_id id) = 0;
  // Stops posting the batch's remaining writes; wait() then reports errc::cancelled and the target
  // receives a cancelled notice (when the peer is still reachable).
  virtual void cancel(transfer_id id) = 0;
  // Blocks until a batch written *to us* by the peer completed (or was cancelled), or the deadline.
  virtual expected<transfer_notice> wait_notice(clock::time_point deadline) = 0;
  // A human-readable path, e.g. "fabric/tcp 10.0.0.2:7000" or "local".
  virtual std::string describe_path() const = 0;
};

// Memory registration shared by every connection of a transport. Thread-safe.
class kv_transport {
 public:
  virtual ~kv_transport() = default;
  virtual std::string name() const = 0; // "tcp", "verbs", "efa", "local"
  // Registers [ptr, ptr + length) for local reads and remote writes. Blocks briefly (pins pages).
  virtual expected<region_id> register_memory(void* ptr, size_t length, memory_kind kind) = 0;
  virtual expected<void> deregister(region_id id) = 0;
  virtual expected<region_descriptor> describe(region_id id) const = 0;
  virtual size_t registration_count() const = 0;
};

} // namespace troupe::cluster::transfer
