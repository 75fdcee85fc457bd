// Collectives and point-to-point transfers on device buffers, enqueued on a CUDA stream: what the
// sharded CUDA backend calls (all-reduce after o_proj/down_proj, logits all-gather, hidden states
// between pipeline stages, MoE token rows between expert ranks). NCCL, or host-staged over any host
// communicator (Gloo). Plain C++: usable without nvcc. Calls enqueue and return (host-staged ones
// block); synchronize() blocks.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "engine/comm/communicator.hpp"
#include "runtime/error.hpp"

struct CUstream_st; // cudaStream_t is CUstream_st*

namespace troupe::engine::comm {

using device_stream = CUstream_st*;

enum class device_dtype : uint8_t { f32, bf16 };

inline size_t dtype_bytes(device_dtype t) {
  return t == device_dtype::f32 ? 4 : 2;
}

class device_communicator {
 public:
  virtual ~device_communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "nccl" or "host-staged over <host>": reported, never silently swapped.
  virtual std::string name() const = 0;
  // True when every call may be recorded into a CUDA graph (NCCL); false for host-staged.
  virtual bool capturable() const = 0;

  // data[count] on every rank becomes the elementwise sum over ranks (in place).
  virtual expected<void> all_reduce_sum(void* data, size_t count, device_dtype t,
                                        device_stream s) = 0;
  // out[size * count] = every rank's in[count], in rank order.
  virtual expected<void> all_gather(const void* in, void* out, size_t count, device_dtype t,
                                    device_stream s) = 0;
  // data[count] on every rank becomes root's data[count].
  virtual expected<void> broadcast(void* data, size_t count, device_dtype t, int root,
                                   device_stream s) = 0;
  // Personalised exchange as communicator::all_to_all: send_counts[r] elements of `send` go to
  // rank r, recv_counts[r] from rank r land in `recv`, both in rank order (host count lists of
  // size() entries). NCCL: one group of ncclSend/ncclRecv pairs; capturable like the others only
  // when the counts are the same at replay.
  virtual expected<void> all_to_all(const void* send, std::span<const int64_t> send_counts,
                                    void* recv, std::span<const int64_t> recv_counts,
                                    device_dtype t, device_stream s) = 0;
  virtual expected<void> send(const void* data, size_t count, device_dtype t, int to,
                              device_stream s) = 0;
  virtual expected<void> recv(void* data, size_t count, device_dtype t, int from,
                              device_stream s) = 0;
  // Blocks until the work enqueued on `s` is done. A dead peer or a collective stuck longer than
  // the communicator's timeout ends in an error (NCCL: the communicator is then aborted and every
  // later call fails), never a hang.
  virtual expected<void> synchronize(device_stream s) = 0;
};

struct nccl_options {
  int device = 0;              // the CUDA device of this rank
  std::string prefix = "nccl"; // store key prefix: one per group sharing a store
  std::chrono::milliseconds timeout{30000};
};

// Joins an NCCL group of `size` ranks: rank 0 creates the unique id and publishes it under
// "<prefix>/unique_id" in `store`, the others fetch it. Non-blocking init, aborted after the
// timeout. Blocks until every rank has joined. Errors without CUDA/NCCL in the build.
expected<std::unique_ptr<device_communicator>>
make_nccl_communicator(rendezvous_store& store, int rank, int size, const nccl_options& options);

// Device -> host copy, `host` collective, host -> device copy: the fallback wherever NCCL cannot
// run (several ranks on one GPU, no NCCL). bf16 travels as float32 (sums round once). Every call
// synchronizes `s` and blocks; not capturable. `host` must outlive the result.
expected<std::unique_ptr<device_communicator>> make_host_staged_communicator(communicator& host);

// Whether NCCL support was built in.
bool nccl_available();

} // namespace troupe::engine::comm
