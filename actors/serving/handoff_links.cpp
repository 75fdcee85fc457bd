#include "actors/serving/handoff_links.hpp"

#include <future>

#include "actors/serving/kv_net.hpp"
#include "cluster/transfer/local_transport.hpp"

namespace troupe::serve {

namespace {

namespace tr = cluster::transfer;
using namespace std::chrono_literals;

// One replica's transport, and how to connect a prefill end to a decode end.
class endpoint {
 public:
  virtual ~endpoint() = default;
  virtual std::shared_ptr<tr::kv_transport> transport() = 0;
  // Connects `from` (prefill) to this (decode): {prefill end, decode end}.
  virtual expected<
      std::pair<std::unique_ptr<tr::kv_connection>, std::unique_ptr<tr::kv_connection>>>
  accept_from(endpoint& from) = 0;
};

class local_endpoint final : public endpoint {
 public:
  std::shared_ptr<tr::kv_transport> transport() override { return t_; }
  expected<std::pair<std::unique_ptr<tr::kv_connection>, std::unique_ptr<tr::kv_connection>>>
  accept_from(endpoint& from) override {
    return tr::local_transport::connect_pair(static_cast<local_endpoint&>(from).t_, t_);
  }

 private:
  std::shared_ptr<tr::local_transport> t_ = std::make_shared<tr::local_transport>();
};

// A listening transport (fabric, socket): the decode end listens, the prefill end connects.
class listening_endpoint final : public endpoint {
 public:
  explicit listening_endpoint(net_transport t) : t_(std::move(t)) {}
  std::shared_ptr<tr::kv_transport> transport() override { return t_.transport; }
  expected<std::pair<std::unique_ptr<tr::kv_connection>, std::unique_ptr<tr::kv_connection>>>
  accept_from(endpoint& from) override {
    if (address_.empty()) {
      auto a = t_.listen(0);
      if (!a)
        return std::move(a).error();
      address_ = *a;
    }
    const auto deadline = tr::clock::now() + 10s;
    auto accepted = std::async(std::launch::async, [&] { return t_.accept(deadline); });
    auto out = static_cast<listening_endpoint&>(from).t_.connect(address_, deadline);
    auto in = accepted.get();
    if (!out)
      return std::move(out).error().context("connecting to " + address_);
    if (!in)
      return std::move(in).error().context("accepting on " + address_);
    return std::pair{std::move(*out), std::move(*in)};
  }

 private:
  net_transport t_;
  std::string address_;
};

expected<std::unique_ptr<endpoint>> open_endpoint(const std::string& provider) {
  if (provider == "auto" || provider == "local")
    return std::unique_ptr<endpoint>(new local_endpoint());
  auto t = open_net_transport(provider, "127.0.0.1");
  if (!t)
    return std::move(t).error().context("disaggregation.provider");
  return std::unique_ptr<endpoint>(new listening_endpoint(std::move(*t)));
}

// Registers every KV allocation of `layout`; the region ids in allocation order.
expected<std::vector<tr::region_id>> register_kv(tr::kv_transport& t,
                                                 const engine::kv_layout& layout) {
  std::vector<tr::region_id> ids;
  for (const auto& a : layout.allocations) {
    auto id = t.register_memory(a.base, a.bytes,
                                a.on_gpu ? tr::memory_kind::cuda : tr::memory_kind::host);
    if (!id)
      return std::move(id).error().context(fmt::format(
          "registering {} bytes of KV cache with the {} transport{}", a.bytes, t.name(),
          a.on_gpu ? " (in one process GPU KV moves over provider local or auto; staging through "
                     "host memory runs between node processes)"
                   : ""));
    ids.push_back(*id);
  }
  return ids;
}

} // namespace

expected<handoff_links> link_in_process(const disaggregation_config& config,
                                        const std::vector<engine::kv_layout>& prefill,
                                        const std::vector<engine::kv_layout>& decode,
                                        const std::vector<std::shared_ptr<void>>& decode_owners) {
  if (config.staging == "always")
    return make_error(errc::invalid_argument,
                      "disaggregation.staging: always stages KV between node processes; in one "
                      "process the groups share memory (use staging: auto)");
  handoff_links links;
  links.stats = std::make_shared<handoff_stats>();
  std::vector<std::unique_ptr<endpoint>> d_ends; // decode ends listen for every prefill end
  std::vector<std::vector<tr::region_descriptor>> d_regions;
  for (const auto& layout : decode) {
    auto e = open_endpoint(config.provider);
    if (!e)
      return std::move(e).error();
    auto ids = register_kv(*(*e)->transport(), layout);
    if (!ids)
      return std::move(ids).error();
    auto& descs = d_regions.emplace_back();
    for (auto id : *ids) {
      auto d = (*e)->transport()->describe(id);
      if (!d)
        return std::move(d).error();
      descs.push_back(*d);
    }
    // One rank on each side: one pair, one notice per handoff.
    auto role =
        make_decode_role(config, static_cast<uint32_t>(links.decode.size()), 1, links.stats);
    role->transport = (*e)->transport();
    links.decode.push_back(std::move(role));
    d_ends.push_back(std::move(*e));
  }
  for (size_t p = 0; p < prefill.size(); ++p) {
    auto e = open_endpoint(config.provider);
    if (!e)
      return std::move(e).error();
    auto role = std::make_shared<prefill_role>();
    role->transport = (*e)->transport();
    auto ids = register_kv(*role->transport, prefill[p]);
    if (!ids)
      return std::move(ids).error();
    auto pusher = std::make_shared<layer_pusher>(prefill[p], std::move(*ids), 0, std::nullopt);
    role->stats = links.stats;
    for (size_t d = 0; d < decode.size(); ++d) {
      auto plan = tr::kv_handoff_plan::make({prefill[p]}, {decode[d]});
      if (!plan)
        return std::move(plan).error().context("prefill and decode groups");
      if (links.describe.empty())
        links.describe = fmt::format("provider {}: {}", role->transport->name(), plan->describe());
      auto ends = d_ends[d]->accept_from(**e);
      if (!ends)
        return std::move(ends).error().context(
            fmt::format("linking prefill replica {} to decode replica {}", p, d));
      pusher->link(static_cast<uint32_t>(d),
                   {.plan = std::make_shared<const tr::kv_handoff_plan>(std::move(*plan)),
                    .pairs = {{.pair = 0, .conn = std::move(ends->first), .remote = d_regions[d]}},
                    .keepalive = d < decode_owners.size() ? decode_owners[d] : nullptr});
      links.decode[d]->inbound.push_back(std::move(ends->second));
    }
    role->pusher = pusher;
    links.pushers.push_back(std::move(pusher));
    links.prefill.push_back(std::move(role)); // keeps the transport; the endpoint is done
  }
  links.stats->provider =
      links.prefill.empty() ? config.provider : links.prefill.front()->transport->name();
  return links;
}

} // namespace troupe::serve
