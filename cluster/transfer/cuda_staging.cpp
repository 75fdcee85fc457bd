#include "cluster/transfer/cuda_staging.hpp"

#include <cuda_runtime.h>

#include <optional>

#include "cluster/transfer/write_plan.hpp"

namespace troupe::cluster::transfer {
namespace {
error cuda_error(std::string_view what, cudaError_t rc) {
  return make_error(errc::io_error, "{}: {}", what, cudaGetErrorString(rc));
}
} // namespace

struct cuda_stager::slot {
  void* host = nullptr;
  region_id id = 0;
  cudaEvent_t copied = nullptr;
  std::optional<transfer_id> in_flight;
};

cuda_stager::cuda_stager(kv_transport& transport) : transport_(transport) {}

expected<std::unique_ptr<cuda_stager>> cuda_stager::create(kv_transport& transport,
                                                           uint64_t slot_bytes, int slots) {
  auto s = std::unique_ptr<cuda_stager>(new cuda_stager(transport));
  s->slot_bytes_ = slot_bytes;
  cudaStream_t stream = nullptr;
  if (auto rc = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); rc != cudaSuccess)
    return cuda_error("cudaStreamCreate", rc);
  s->stream_ = stream;
  for (int i = 0; i < slots; ++i) {
    auto sl = std::make_unique<slot>();
    if (auto rc = cudaHostAlloc(&sl->host, slot_bytes, cudaHostAllocDefault); rc != cudaSuccess)
      return cuda_error("cudaHostAlloc of a staging slot", rc);
    if (auto rc = cudaEventCreateWithFlags(&sl->copied, cudaEventDisableTiming); rc != cudaSuccess)
      return cuda_error("cudaEventCreate", rc);
    auto id = transport.register_memory(sl->host, slot_bytes, memory_kind::pinned_host);
    s->slots_.push_back(std::move(sl));
    if (!id)
      return std::move(id).error();
    s->slots_.back()->id = *id;
  }
  return s;
}

cuda_stager::~cuda_stager() {
  for (auto& sl : slots_) {
    if (sl->id != 0)
      (void)transport_.deregister(sl->id);
    if (sl->copied)
      cudaEventDestroy(sl->copied);
    if (sl->host)
      cudaFreeHost(sl->host);
  }
  if (stream_)
    cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

expected<uint64_t> cuda_stager::send_layers(kv_connection& connection, const void* device_base,
                                            std::span<const layer_ranges> layers,
                                            std::span<const region_descriptor> remotes,
                                            uint64_t first_lease, clock::time_point deadline) {
  auto stream = static_cast<cudaStream_t>(stream_);
  const char* base = static_cast<const char*>(device_base);
  uint64_t bytes = 0;
  auto drain = [&](slot& sl) -> expected<void> {
    if (!sl.in_flight)
      return {};
    auto done = connection.wait(*sl.in_flight);
    sl.in_flight.reset();
    if (!done)
      return std::move(done).error();
    bytes += done->bytes;
    return {};
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    slot& sl = *slots_[l % slots_.size()];
    TROUPE_TRY_VOID(drain(sl)); // the slot's previous layer must have left before it is reused
    write_batch batch{.lease_id = first_lease + l,
                      .locals = {sl.id},
                      .remotes = {remotes.begin(), remotes.end()},
                      .deadline = deadline};
    uint64_t packed = 0;
    for (const write_range& r : layers[l].ranges) {
      if (packed + r.length > slot_bytes_)
        return make_error(errc::out_of_range, "layer {}: {} bytes exceed the {}-byte staging slot",
                          l, packed + r.length, slot_bytes_);
      if (auto rc = cudaMemcpyAsync(static_cast<char*>(sl.host) + packed, base + r.local_offset,
                                    r.length, cudaMemcpyDeviceToHost, stream);
          rc != cudaSuccess)
        return cuda_error(fmt::format("layer {}: copy-out", l), rc);
      batch.ranges.push_back({0, packed, r.remote, r.remote_offset, r.length});
      packed += r.length;
    }
    if (auto rc = cudaEventRecord(sl.copied, stream); rc != cudaSuccess)
      return cuda_error("cudaEventRecord", rc);
    // Layer l is posted once its copy landed; the GPU copies layer l+1 while the network sends l.
    if (auto rc = cudaEventSynchronize(sl.copied); rc != cudaSuccess)
      return cuda_error(fmt::format("layer {}: copy-out", l), rc);
    auto id = connection.post(std::move(batch));
    if (!id)
      return std::move(id).error().context(fmt::format("layer {}", l));
    sl.in_flight = *id;
  }
  for (auto& sl : slots_)
    TROUPE_TRY_VOID(drain(*sl));
  return bytes;
}

} // namespace troupe::cluster::transfer
