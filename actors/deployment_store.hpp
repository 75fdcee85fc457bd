// Deployment records that outlive the head process (design.md §7): each deployment's config is
// written when it becomes ready and removed when it is stopped, so that a head restarted after a
// crash serves the same deployments again. A clean `cluster stop` forgets them. One file per
// deployment under <dir>/ (CAF's binary form of deployment_config behind a version line, mode
// 0600: it may hold the API key). Blocking calls on small files in the head's own temp dir.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "runtime/config.hpp"
#include "runtime/error.hpp"

namespace troupe::actors {

class deployment_store {
 public:
  deployment_store() = default; // disabled: saves and loads nothing
  deployment_store(std::filesystem::path dir, std::string version);

  bool enabled() const { return !dir_.empty(); }
  expected<void> save(const deployment_config& dc) const;
  void remove(const std::string& name) const;
  void clear() const; // every record (a clean stop)

  struct loaded {
    std::vector<deployment_config> configs;
    std::vector<troupe::error> skipped; // unreadable records or another version's (removed)
  };
  loaded load_all() const;

 private:
  std::filesystem::path file_of(const std::string& name) const;
  std::filesystem::path dir_;
  std::string version_;
};

} // namespace troupe::actors
