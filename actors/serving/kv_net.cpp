#include "actors/serving/kv_net.hpp"

#include "cluster/transfer/socket_transport.hpp"
#ifdef TROUPE_WITH_FABRIC
#include "cluster/transfer/fabric_transport.hpp"
#endif

namespace troupe::serve {

namespace {

namespace tr = cluster::transfer;

template <class T>
net_transport wrap(std::shared_ptr<T> t) {
  return {.transport = t,
          .listen = [t](uint16_t port) { return t->listen(port); },
          .accept = [t](tr::clock::time_point deadline) { return t->accept(deadline); },
          .connect = [t](const std::string& address,
                         tr::clock::time_point deadline) { return t->connect(address, deadline); }};
}

} // namespace

expected<net_transport> open_net_transport(const std::string& provider, const std::string& host,
                                           bool cuda_ipc) {
  if (cuda_ipc) {
    if (provider != "auto" && provider != "socket")
      return make_error(errc::invalid_argument,
                        "KV by CUDA IPC goes over the socket transport, not provider '{}'",
                        provider);
    auto t = tr::socket_transport::create_with_cuda_ipc(host);
    if (!t)
      return std::move(t).error();
    return wrap(std::move(*t));
  }
  if (provider == "socket")
    return wrap(tr::socket_transport::create(host));
#ifdef TROUPE_WITH_FABRIC
  auto t = tr::fabric_transport::open({.provider = provider, .host = host});
  if (!t)
    return std::move(t).error();
  return wrap(std::shared_ptr<tr::fabric_transport>(std::move(*t)));
#else
  if (provider == "auto")
    return wrap(tr::socket_transport::create(host));
  return make_error(errc::unsupported,
                    "KV transfer provider '{}': this build has no libfabric (install "
                    "libfabric-dev and rebuild), use socket",
                    provider);
#endif
}

std::string kv_cuda_ipc_host(const deployment_config& c, std::span<const std::string> rank_hosts) {
  const auto& d = c.disaggregation;
  if (!d.enabled || c.device != "cuda" || (d.provider != "auto" && d.provider != "socket") ||
      d.staging == "always" || rank_hosts.empty() || rank_hosts.front().empty())
    return {};
  for (const auto& h : rank_hosts)
    if (h != rank_hosts.front())
      return {};
  return rank_hosts.front();
}

} // namespace troupe::serve
