// Internals shared by fabric_transport and fabric_connection: RAII for libfabric objects, the
// domain with its memory registrations, and error text with fi_strerror. Not for callers outside
// transfer/.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>

#include "cluster/transfer/kv_transport.hpp"

namespace troupe::cluster::transfer::detail {

// "fi_write: Connection reset by peer (-104)".
error fi_error(errc code, std::string_view what, int rc);

struct fid_deleter {
  void operator()(fid* f) const;
};
template <class T>
struct fid_ptr_deleter {
  void operator()(T* p) const {
    if (p)
      fid_deleter{}(&p->fid);
  }
};
template <class T>
using fid_ptr = std::unique_ptr<T, fid_ptr_deleter<T>>;

struct info_deleter {
  void operator()(fi_info* p) const { fi_freeinfo(p); }
};
using info_ptr = std::unique_ptr<fi_info, info_deleter>;

// A local registration as the connection's progress thread uses it.
struct resolved_region {
  char* base = nullptr;
  uint64_t length = 0;
  void* desc = nullptr;
};

// The fabric, domain and registrations one transport and all its connections share.
class fabric_domain {
 public:
  info_ptr info;              // what the domain was opened with (provider, mr_mode, limits)
  fid_ptr<fid_fabric> fabric; // closed after the domain (members destroyed in reverse order)
  fid_ptr<fid_domain> domain;

  ~fabric_domain();
  expected<region_id> add(void* ptr, size_t length, memory_kind kind);
  expected<void> remove(region_id id);
  expected<region_descriptor> describe(region_id id) const;
  size_t count() const;
  // Resolves and pins (in-use count) the batch's local regions; release() undoes it.
  expected<std::vector<resolved_region>> acquire(std::span<const region_id> ids);
  void release(std::span<const region_id> ids);

 private:
  struct entry {
    fid_mr* mr = nullptr;
    char* base = nullptr;
    uint64_t length = 0;
    memory_kind kind = memory_kind::host;
    int in_use = 0;
  };
  mutable std::mutex mu_;
  std::map<region_id, entry> regions_;
  region_id next_id_ = 1;
};

} // namespace troupe::cluster::transfer::detail
