#include "cluster/transfer/fabric_transport.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include <rdma/fi_cm.h>
#include <rdma/fi_errno.h>

#include "cluster/transfer/fabric_common.hpp"
#include "cluster/transfer/fabric_connection.hpp"
#include "runtime/log.hpp"

namespace troupe::cluster::transfer {
namespace {

using detail::fi_error;
using detail::fid_ptr;
using detail::info_ptr;

constexpr uint32_t fi_api_version = FI_VERSION(1, 10);
constexpr uint64_t default_max_write = uint64_t{1} << 30;
const char* const auto_order[] = {"verbs", "efa", "tcp"};

// The strictest common subset (design.md §6): connected endpoints, messages for the notice, RMA
// writes, every registration mode verbs needs, and a context per operation.
info_ptr make_hints(const std::string& provider, const char* domain_name = nullptr) {
  info_ptr h(fi_allocinfo());
  h->ep_attr->type = FI_EP_MSG;
  h->caps = FI_MSG | FI_RMA | FI_SEND | FI_RECV | FI_WRITE | FI_REMOTE_WRITE;
  h->mode = FI_CONTEXT | FI_CONTEXT2;
  h->addr_format = FI_SOCKADDR_IN;
  h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
  h->domain_attr->threading = FI_THREAD_SAFE;
  h->fabric_attr->prov_name = strdup(provider.c_str());
  if (domain_name)
    h->domain_attr->name = strdup(domain_name);
  return h;
}

expected<info_ptr> get_info(const std::string& provider, const char* node, const char* service,
                            uint64_t flags, const char* domain_name = nullptr) {
  info_ptr hints = make_hints(provider, domain_name);
  fi_info* info = nullptr;
  if (int rc = fi_getinfo(fi_api_version, node, service, flags, hints.get(), &info); rc != 0) {
    std::string why =
        rc == -FI_ENODATA ? "no device or no FI_EP_MSG endpoint with FI_RMA" : fi_strerror(-rc);
    if (provider == "verbs" && rc == -FI_ENODATA)
      why += " (needs an RDMA device with an IP address and rdma_cm: `ibv_devices`, `rdma link`)";
    if (provider == "efa" && rc == -FI_ENODATA)
      why += " (efa offers reliable-datagram endpoints only, or no EFA device)";
    return make_error(errc::unavailable, "provider {}: {}", provider, why);
  }
  return info_ptr(info);
}

std::string sockaddr_text(const void* addr) {
  if (addr == nullptr)
    return "?";
  auto* in = static_cast<const sockaddr_in*>(addr);
  char ip[INET_ADDRSTRLEN] = {0};
  inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
  return fmt::format("{}:{}", ip, ntohs(in->sin_port));
}

expected<fid_ptr<fid_eq>> open_eq(fid_fabric* fabric) {
  fi_eq_attr attr{};
  attr.size = 16;
  attr.wait_obj = FI_WAIT_UNSPEC;
  fid_eq* eq = nullptr;
  if (int rc = fi_eq_open(fabric, &attr, &eq, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_eq_open", rc);
  return fid_ptr<fid_eq>(eq);
}

// Waits for FI_CONNECTED on `eq`; a refused or failed connection becomes an error naming the peer.
expected<void> wait_connected(fid_eq* eq, clock::time_point deadline, const std::string& peer) {
  alignas(8) uint8_t buf[512];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (left.count() <= 0)
      return make_error(errc::timeout, "connecting with {}: no answer before the deadline", peer);
    uint32_t event = 0;
    ssize_t rc = fi_eq_sread(eq, &event, buf, sizeof buf, static_cast<int>(left.count()), 0);
    if (rc == -FI_EAGAIN || rc == -FI_ETIMEDOUT)
      continue;
    if (rc == -FI_EAVAIL) {
      fi_eq_err_entry err{};
      fi_eq_readerr(eq, &err, 0);
      return fi_error(errc::unavailable, fmt::format("connecting with {}", peer), -err.err);
    }
    if (rc < 0)
      return fi_error(errc::unavailable, "fi_eq_sread", static_cast<int>(rc));
    if (event == FI_CONNECTED)
      return {};
    return make_error(errc::unavailable, "connecting with {}: unexpected event {}", peer, event);
  }
}

constexpr auto handshake = std::chrono::seconds(5);

} // namespace

struct fabric_transport::listener {
  fid_ptr<fid_eq> eq;
  fid_ptr<fid_pep> pep;
  std::string address;
};

namespace {

// An enabled endpoint bound to its own EQ and CQ, with registered notice buffers.
expected<detail::fabric_connection::parts> make_endpoint(detail::fabric_domain& d, fi_info* info) {
  using conn = detail::fabric_connection;
  conn::parts p;
  TROUPE_ASSIGN(p.eq, open_eq(d.fabric.get()));
  fi_cq_attr cq_attr{};
  cq_attr.size = (d.info->tx_attr ? d.info->tx_attr->size : 256) + conn::recv_slots + 16;
  cq_attr.format = FI_CQ_FORMAT_MSG;
  cq_attr.wait_obj = FI_WAIT_UNSPEC;
  fid_cq* cq = nullptr;
  if (int rc = fi_cq_open(d.domain.get(), &cq_attr, &cq, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_cq_open", rc);
  p.cq.reset(cq);
  fid_ep* ep = nullptr;
  if (int rc = fi_endpoint(d.domain.get(), info, &ep, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_endpoint", rc);
  p.ep.reset(ep);
  if (int rc = fi_ep_bind(ep, &p.eq->fid, 0); rc != 0)
    return fi_error(errc::unavailable, "fi_ep_bind(eq)", rc);
  if (int rc = fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV); rc != 0)
    return fi_error(errc::unavailable, "fi_ep_bind(cq)", rc);
  if (int rc = fi_enable(ep); rc != 0)
    return fi_error(errc::unavailable, "fi_enable", rc);
  size_t slots = conn::recv_slots + conn::send_slots;
  p.notice_buffers = std::make_unique<detail::notice_wire[]>(slots);
  static std::atomic<uint64_t> notice_key{uint64_t{1} << 40};
  fid_mr* mr = nullptr;
  if (int rc =
          fi_mr_reg(d.domain.get(), p.notice_buffers.get(), slots * sizeof(detail::notice_wire),
                    FI_SEND | FI_RECV, 0, notice_key++, 0, &mr, nullptr);
      rc != 0)
    return fi_error(errc::resource_exhausted, "fi_mr_reg (notice buffers)", rc);
  p.notice_mr.reset(mr);
  return p;
}

} // namespace

expected<std::unique_ptr<fabric_transport>> fabric_transport::open(const fabric_options& options) {
  std::vector<std::string> candidates;
  if (options.provider == "auto")
    candidates.assign(std::begin(auto_order), std::end(auto_order));
  else if (options.provider == "verbs" || options.provider == "efa" || options.provider == "tcp")
    candidates.push_back(options.provider);
  else
    return make_error(errc::invalid_argument,
                      "transfer provider '{}': expected auto, verbs, efa or tcp", options.provider);
  std::vector<std::string> skipped;
  info_ptr info;
  for (const std::string& name : candidates) {
    auto got = get_info(name, options.host.c_str(), nullptr, FI_SOURCE);
    if (got) {
      info = std::move(*got);
      break;
    }
    skipped.push_back(got.error().message());
  }
  if (!info)
    return make_error(errc::unavailable, "no usable transfer provider on {}: {}", options.host,
                      fmt::join(skipped, "; "));
  auto t = std::unique_ptr<fabric_transport>(new fabric_transport());
  t->domain_ = std::make_shared<detail::fabric_domain>();
  auto& d = *t->domain_;
  fid_fabric* fabric = nullptr;
  if (int rc = fi_fabric(info->fabric_attr, &fabric, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_fabric", rc);
  d.fabric.reset(fabric);
  fid_domain* domain = nullptr;
  if (int rc = fi_domain(fabric, info.get(), &domain, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_domain", rc);
  d.domain.reset(domain);
  uint64_t provider_max =
      info->ep_attr->max_msg_size ? info->ep_attr->max_msg_size : default_max_write;
  t->max_write_ = std::min(options.max_write ? options.max_write : default_max_write, provider_max);
  t->host_ = options.host;
  std::string prov = info->fabric_attr->prov_name;
  t->choice_ = options.provider == "auto"
                   ? fmt::format("{} (auto{}{})", prov, skipped.empty() ? "" : "; ",
                                 fmt::join(skipped, "; "))
                   : prov;
  d.info = std::move(info);
  log::info("transfer: provider {}", t->choice_);
  return t;
}

fabric_transport::~fabric_transport() = default;

std::string fabric_transport::name() const {
  return domain_->info->fabric_attr->prov_name;
}

size_t fabric_transport::tx_depth() const {
  return domain_->info->tx_attr ? domain_->info->tx_attr->size : 0;
}

expected<region_id> fabric_transport::register_memory(void* ptr, size_t length, memory_kind kind) {
  return domain_->add(ptr, length, kind);
}
expected<void> fabric_transport::deregister(region_id id) {
  return domain_->remove(id);
}
expected<region_descriptor> fabric_transport::describe(region_id id) const {
  return domain_->describe(id);
}
size_t fabric_transport::registration_count() const {
  return domain_->count();
}

expected<std::string> fabric_transport::listen(uint16_t port) {
  std::string service = std::to_string(port);
  auto got =
      get_info(name(), host_.c_str(), service.c_str(), FI_SOURCE, domain_->info->domain_attr->name);
  if (!got)
    return std::move(got).error();
  info_ptr info = std::move(*got);
  auto l = std::make_unique<listener>();
  TROUPE_ASSIGN(l->eq, open_eq(domain_->fabric.get()));
  fid_pep* pep = nullptr;
  if (int rc = fi_passive_ep(domain_->fabric.get(), info.get(), &pep, nullptr); rc != 0)
    return fi_error(errc::unavailable, "fi_passive_ep", rc);
  l->pep.reset(pep);
  if (int rc = fi_pep_bind(pep, &l->eq->fid, 0); rc != 0)
    return fi_error(errc::unavailable, "fi_pep_bind", rc);
  if (int rc = fi_listen(pep); rc != 0)
    return fi_error(errc::unavailable, fmt::format("fi_listen on {}:{}", host_, port), rc);
  sockaddr_in bound{};
  size_t len = sizeof bound;
  if (int rc = fi_getname(&pep->fid, &bound, &len); rc != 0)
    return fi_error(errc::unavailable, "fi_getname", rc);
  l->address = sockaddr_text(&bound);
  listener_ = std::move(l);
  return listener_->address;
}

expected<std::unique_ptr<kv_connection>> fabric_transport::accept(clock::time_point deadline) {
  if (!listener_)
    return make_error(errc::invalid_argument, "accept: listen() first");
  alignas(8) uint8_t buf[sizeof(fi_eq_cm_entry) + 256];
  uint32_t event = 0;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (left.count() <= 0)
      return make_error(errc::timeout, "accept on {}: no peer before the deadline",
                        listener_->address);
    ssize_t rc = fi_eq_sread(listener_->eq.get(), &event, buf, sizeof buf,
                             static_cast<int>(left.count()), 0);
    if (rc == -FI_EAGAIN || rc == -FI_ETIMEDOUT)
      continue;
    if (rc < 0)
      return fi_error(errc::unavailable, "fi_eq_sread (listener)", static_cast<int>(rc));
    if (event == FI_CONNREQ)
      break;
  }
  info_ptr info(reinterpret_cast<fi_eq_cm_entry*>(buf)->info);
  std::string peer =
      fmt::format("{} {} from {}", name(), listener_->address, sockaddr_text(info->dest_addr));
  auto made = make_endpoint(*domain_, info.get());
  if (!made)
    return std::move(made).error();
  auto parts = std::move(*made);
  if (int rc = fi_accept(parts.ep.get(), nullptr, 0); rc != 0)
    return fi_error(errc::unavailable, "fi_accept", rc);
  // A peer that asked before the deadline gets its handshake finished, however close it was.
  TROUPE_TRY_VOID(
      wait_connected(parts.eq.get(), std::max(deadline, clock::now() + handshake), peer));
  return std::unique_ptr<kv_connection>(
      new detail::fabric_connection(domain_, std::move(parts), peer, max_write_));
}

expected<std::unique_ptr<kv_connection>> fabric_transport::connect(const std::string& address,
                                                                   clock::time_point deadline) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
    return make_error(errc::invalid_argument, "connect: '{}' is not host:port", address);
  std::string host = address.substr(0, colon), service = address.substr(colon + 1);
  auto got = get_info(name(), host.c_str(), service.c_str(), 0, domain_->info->domain_attr->name);
  if (!got)
    return std::move(got).error();
  info_ptr info = std::move(*got);
  auto made = make_endpoint(*domain_, info.get());
  if (!made)
    return std::move(made).error();
  auto parts = std::move(*made);
  if (int rc = fi_connect(parts.ep.get(), info->dest_addr, nullptr, 0); rc != 0)
    return fi_error(errc::unavailable, fmt::format("fi_connect to {}", address), rc);
  std::string peer = fmt::format("{} to {}", name(), address);
  TROUPE_TRY_VOID(wait_connected(parts.eq.get(), deadline, peer));
  return std::unique_ptr<kv_connection>(
      new detail::fabric_connection(domain_, std::move(parts), peer, max_write_));
}

std::vector<provider_probe> probe_providers(const std::string& host) {
  std::vector<provider_probe> out;
  for (const char* name : auto_order) {
    auto info = get_info(name, host.c_str(), nullptr, FI_SOURCE);
    if (!info) {
      out.push_back({name, false, info.error().message()});
      continue;
    }
    fi_info* i = info->get();
    out.push_back({name, true,
                   fmt::format("fabric {}, domain {}, max message {}, tx depth {}, mr_mode {:#x}, "
                               "CUDA memory {}",
                               i->fabric_attr->name, i->domain_attr->name, i->ep_attr->max_msg_size,
                               i->tx_attr->size, i->domain_attr->mr_mode,
                               (i->caps & FI_HMEM) ? "yes" : "no (staged)")});
  }
  return out;
}

} // namespace troupe::cluster::transfer
