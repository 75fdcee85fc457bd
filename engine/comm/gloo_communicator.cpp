// Gloo (Debian libgloo-dev) behind comm::communicator: TCP transport, rendezvous through our
// rendezvous_store. Gloo reports failures by exceptions; they are caught here and become errors.
#include <exception>

#include <fmt/format.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include "engine/comm/communicator.hpp"

namespace troupe::engine::comm {

namespace {

// Adapts rendezvous_store to Gloo's Store, whose failures are exceptions.
class gloo_store_adapter final : public gloo::rendezvous::Store {
 public:
  gloo_store_adapter(rendezvous_store& store, std::chrono::milliseconds timeout)
    : store_(store), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    if (auto r = store_.set(key, data); !r)
      throw std::runtime_error(r.error().to_string());
  }
  std::vector<char> get(const std::string& key) override {
    auto r = store_.get(key, timeout_);
    if (!r)
      throw std::runtime_error(r.error().to_string());
    return std::move(*r);
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    if (auto r = store_.wait(keys, timeout); !r)
      throw std::runtime_error(r.error().to_string());
  }

 private:
  rendezvous_store& store_;
  std::chrono::milliseconds timeout_;
};

// Runs a Gloo call, turning its exceptions into errors that name the operation and the rank.
template <typename F>
expected<void> guarded(const char* op, int rank, F&& f) {
  try {
    f();
    return {};
  } catch (const std::exception& e) {
    return make_error(errc::unavailable, "gloo {} on rank {}: {}", op, rank, e.what());
  }
}

constexpr uint64_t p2p_slot_prefix = uint64_t{0x54} << 56; // apart from Gloo's collective slots

class gloo_communicator final : public communicator {
 public:
  gloo_communicator(std::shared_ptr<gloo::rendezvous::Context> ctx,
                    std::shared_ptr<gloo::transport::Device> dev, std::chrono::milliseconds timeout)
    : ctx_(std::move(ctx)), dev_(std::move(dev)), timeout_(timeout) {}

  int rank() const override { return ctx_->rank; }
  int size() const override { return ctx_->size; }

  expected<void> all_reduce_sum(std::span<float> data) override {
    return guarded("all_reduce", rank(), [&] {
      gloo::AllreduceOptions o(ctx_);
      o.setOutput(data.data(), data.size());
      o.setReduceFunction(
          static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      o.setTimeout(timeout_);
      gloo::allreduce(o);
    });
  }
  expected<void> all_gather(std::span<const float> in, std::span<float> out) override {
    if (out.size() != in.size() * static_cast<size_t>(size()))
      return make_error(errc::invalid_argument,
                        "all_gather: output holds {} floats, expected {} x {}", out.size(), size(),
                        in.size());
    return guarded("all_gather", rank(), [&] {
      gloo::AllgatherOptions o(ctx_);
      o.setInput(const_cast<float*>(in.data()), in.size());
      o.setOutput(out.data(), out.size());
      o.setTimeout(timeout_);
      gloo::allgather(o);
    });
  }
  expected<void> broadcast(std::span<float> data, int root) override {
    return guarded("broadcast", rank(), [&] {
      gloo::BroadcastOptions o(ctx_);
      o.setOutput(data.data(), data.size());
      o.setRoot(root);
      o.setTimeout(timeout_);
      gloo::broadcast(o);
    });
  }
  expected<void> all_to_all(std::span<const float> send, std::span<const int64_t> send_counts,
                            std::span<float> recv, std::span<const int64_t> recv_counts) override {
    TROUPE_TRY_VOID(check_all_to_all(size(), send.size(), send_counts, recv.size(), recv_counts));
    // Gloo wants a buffer even where nothing moves.
    float none = 0;
    auto* in = send.empty() ? &none : const_cast<float*>(send.data());
    auto* out = recv.empty() ? &none : recv.data();
    return guarded("all_to_all", rank(), [&] {
      gloo::AlltoallvOptions o(ctx_);
      o.setInput(in, std::vector<int64_t>(send_counts.begin(), send_counts.end()));
      o.setOutput(out, std::vector<int64_t>(recv_counts.begin(), recv_counts.end()));
      o.setTimeout(timeout_);
      gloo::alltoallv(o);
    });
  }
  expected<void> send(std::span<const float> data, int to, uint32_t tag) override {
    auto r = guarded("send", rank(), [&] {
      auto buf = ctx_->createUnboundBuffer(const_cast<float*>(data.data()), data.size_bytes());
      buf->send(to, p2p_slot_prefix | tag);
      if (!buf->waitSend(timeout_))
        throw std::runtime_error("aborted");
    });
    return r;
  }
  expected<void> recv(std::span<float> data, int from, uint32_t tag) override {
    return guarded("recv", rank(), [&] {
      auto buf = ctx_->createUnboundBuffer(data.data(), data.size_bytes());
      buf->recv(from, p2p_slot_prefix | tag);
      if (!buf->waitRecv(timeout_))
        throw std::runtime_error("aborted");
    });
  }
  expected<void> barrier() override {
    return guarded("barrier", rank(), [&] {
      gloo::BarrierOptions o(ctx_);
      o.setTimeout(timeout_);
      gloo::barrier(o);
    });
  }

 private:
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::shared_ptr<gloo::transport::Device> dev_;
  std::chrono::milliseconds timeout_;
};

} // namespace

expected<std::unique_ptr<communicator>>
make_gloo_communicator(rendezvous_store& store, int rank, int size, const gloo_options& options) {
  if (size < 1 || rank < 0 || rank >= size)
    return make_error(errc::invalid_argument, "gloo group: rank {} outside a group of {}", rank,
                      size);
  std::shared_ptr<gloo::rendezvous::Context> ctx;
  std::shared_ptr<gloo::transport::Device> dev;
  auto joined = guarded("rendezvous", rank, [&] {
    gloo::transport::tcp::attr attr;
    if (!options.interface.empty())
      attr.iface = options.interface;
    else
      attr.hostname = options.hostname;
    dev = gloo::transport::tcp::CreateDevice(attr);
    gloo_store_adapter adapter(store, options.timeout);
    gloo::rendezvous::PrefixStore prefixed(options.prefix, adapter);
    ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->setTimeout(options.timeout);
    ctx->connectFullMesh(prefixed, dev);
  });
  if (!joined)
    return make_error(joined.error().code(), "joining group '{}' of {}: {}", options.prefix, size,
                      joined.error().message());
  return std::unique_ptr<communicator>(
      std::make_unique<gloo_communicator>(std::move(ctx), std::move(dev), options.timeout));
}

} // namespace troupe::engine::comm
