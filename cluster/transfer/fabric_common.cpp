#include "cluster/transfer/fabric_common.hpp"

#include <rdma/fi_errno.h>

#include "runtime/log.hpp"

namespace troupe::cluster::transfer::detail {

error fi_error(errc code, std::string_view what, int rc) {
  return make_error(code, "{}: {} ({})", what, fi_strerror(rc < 0 ? -rc : rc), rc);
}

void fid_deleter::operator()(fid* f) const {
  if (f == nullptr)
    return;
  if (int rc = fi_close(f); rc != 0)
    log::warn("fi_close: {} ({})", fi_strerror(-rc), rc);
}

fabric_domain::~fabric_domain() {
  std::lock_guard lock(mu_);
  for (auto& [id, e] : regions_)
    fid_deleter{}(&e.mr->fid);
  regions_.clear();
}

expected<region_id> fabric_domain::add(void* ptr, size_t length, memory_kind kind) {
  if (ptr == nullptr || length == 0)
    return make_error(errc::invalid_argument, "register_memory: empty region");
  if (kind == memory_kind::cuda && !(info->caps & FI_HMEM))
    return make_error(errc::unsupported,
                      "register_memory: provider {} does not report FI_HMEM (CUDA memory)",
                      info->fabric_attr->prov_name);
  region_id id = 0;
  {
    std::lock_guard lock(mu_);
    id = next_id_++;
  }
  // The id doubles as requested key, unique where the provider does not choose keys
  // (FI_MR_PROV_KEY).
  fid_mr* mr = nullptr;
  uint64_t access = FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
  if (int rc = fi_mr_reg(domain.get(), ptr, length, access, 0, id, 0, &mr, nullptr); rc != 0)
    return fi_error(
        errc::resource_exhausted,
        fmt::format("fi_mr_reg of {} bytes (check `ulimit -l`, the memlock limit)", length), rc);
  std::lock_guard lock(mu_);
  regions_[id] = entry{mr, static_cast<char*>(ptr), length, kind, 0};
  return id;
}

expected<void> fabric_domain::remove(region_id id) {
  fid_mr* mr = nullptr;
  {
    std::lock_guard lock(mu_);
    auto it = regions_.find(id);
    if (it == regions_.end())
      return make_error(errc::not_found, "deregister: no region {}", id);
    if (it->second.in_use > 0)
      return make_error(errc::invalid_argument, "deregister: region {} is used by {} transfer(s)",
                        id, it->second.in_use);
    mr = it->second.mr;
    regions_.erase(it);
  }
  if (int rc = fi_close(&mr->fid); rc != 0)
    return fi_error(errc::internal, "fi_close(mr)", rc);
  return {};
}

expected<region_descriptor> fabric_domain::describe(region_id id) const {
  std::lock_guard lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return make_error(errc::not_found, "describe: no region {}", id);
  const entry& e = it->second;
  return region_descriptor{reinterpret_cast<uint64_t>(e.base), e.length, fi_mr_key(e.mr), e.kind};
}

size_t fabric_domain::count() const {
  std::lock_guard lock(mu_);
  return regions_.size();
}

expected<std::vector<resolved_region>> fabric_domain::acquire(std::span<const region_id> ids) {
  std::lock_guard lock(mu_);
  std::vector<resolved_region> out;
  for (region_id id : ids) {
    auto it = regions_.find(id);
    if (it == regions_.end())
      return make_error(errc::not_found, "transfer: no local region {}", id);
    out.push_back({it->second.base, it->second.length, fi_mr_desc(it->second.mr)});
  }
  for (region_id id : ids)
    ++regions_[id].in_use;
  return out;
}

void fabric_domain::release(std::span<const region_id> ids) {
  std::lock_guard lock(mu_);
  for (region_id id : ids)
    if (auto it = regions_.find(id); it != regions_.end())
      --it->second.in_use;
}

} // namespace troupe::cluster::transfer::detail
