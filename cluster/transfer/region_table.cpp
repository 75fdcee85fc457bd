#include "cluster/transfer/region_table.hpp"

namespace troupe::cluster::transfer {

expected<region_id> region_table::add(void* ptr, size_t length, memory_kind kind,
                                      std::optional<cuda_ipc_part> ipc) {
  if (ptr == nullptr || length == 0)
    return make_error(errc::invalid_argument, "register_memory: empty region");
  std::lock_guard lock(mu_);
  const region_id id = next_id_++;
  regions_[id] = {
      region_descriptor{reinterpret_cast<uint64_t>(ptr), length, id, kind, std::move(ipc)}, 0};
  return id;
}

expected<void> region_table::remove(region_id id) {
  std::lock_guard lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return make_error(errc::not_found, "deregister: no region {}", id);
  if (it->second.in_use > 0)
    return make_error(errc::invalid_argument, "deregister: region {} is used by {} transfer(s)", id,
                      it->second.in_use);
  regions_.erase(it);
  return {};
}

expected<region_descriptor> region_table::describe(region_id id) const {
  std::lock_guard lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end())
    return make_error(errc::not_found, "describe: no region {}", id);
  return it->second.desc;
}

size_t region_table::size() const {
  std::lock_guard lock(mu_);
  return regions_.size();
}

expected<std::vector<region_descriptor>> region_table::acquire(std::span<const region_id> ids) {
  std::lock_guard lock(mu_);
  std::vector<region_descriptor> out;
  for (region_id id : ids) {
    auto it = regions_.find(id);
    if (it == regions_.end())
      return make_error(errc::not_found, "transfer: no local region {}", id);
    out.push_back(it->second.desc);
  }
  for (region_id id : ids)
    ++regions_[id].in_use;
  return out;
}

void region_table::release(std::span<const region_id> ids) {
  std::lock_guard lock(mu_);
  for (region_id id : ids)
    if (auto it = regions_.find(id); it != regions_.end())
      --it->second.in_use;
}

expected<region_descriptor> region_table::find(uint64_t key) const {
  std::lock_guard lock(mu_);
  auto it = regions_.find(static_cast<region_id>(key));
  if (it == regions_.end())
    return make_error(errc::not_found, "no region with key {}", key);
  return it->second.desc;
}

} // namespace troupe::cluster::transfer
