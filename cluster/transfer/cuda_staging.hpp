// GPU KV over a transport without CUDA memory support (design.md §6): each layer's blocks are
// copied device → pinned host slot on a CUDA stream, then written as one batch; the copy-out of
// layer l+1 overlaps the network write of layer l. Built only with CUDA; blocking, on the caller's
// thread.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer {

// One layer: ranges whose local_offset is a byte offset from the device base pointer and whose
// remote index/offset address the batch's remote descriptors (pinned host memory on the peer).
struct layer_ranges {
  std::vector<write_range> ranges;
};

class cuda_stager {
 public:
  // Allocates `slots` pinned host buffers of `slot_bytes` and registers them with `transport`.
  static expected<std::unique_ptr<cuda_stager>> create(kv_transport& transport, uint64_t slot_bytes,
                                                       int slots = 2);
  ~cuda_stager();

  // Sends every layer as its own batch (lease id = first_lease + layer) and waits for all of them.
  // Returns the bytes written. Fails naming the layer; blocks at most until `deadline`.
  expected<uint64_t> send_layers(kv_connection& connection, const void* device_base,
                                 std::span<const layer_ranges> layers,
                                 std::span<const region_descriptor> remotes, uint64_t first_lease,
                                 clock::time_point deadline);

 private:
  struct slot;
  explicit cuda_stager(kv_transport& transport);
  kv_transport& transport_;
  std::vector<std::unique_ptr<slot>> slots_;
  void* stream_ = nullptr; // cudaStream_t
  uint64_t slot_bytes_ = 0;
};

} // namespace troupe::cluster::transfer
