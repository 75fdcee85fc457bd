// Builds with CUDA: the CUDA seam functions load libtroupe_cuda.so on first use and forward through
// its table (cuda_plugin.hpp). Nothing here links CUDA: when the plugin or a library it needs
// (CUDA runtime, cuBLASLt, NCCL) is missing, every entry point fails with the loader's reason, and
// cuda_unavailable_reason() says it, so `device: cuda` errors and `device: auto` picks the CPU
// saying why.
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>

#include <fmt/format.h>

#include "engine/backend/cuda/cuda_plugin.hpp"

namespace troupe::engine {
namespace {

struct loaded_plugin {
  const cuda::plugin_table* table = nullptr;
  std::string why; // when table is null
};

// TROUPE_CUDA_PLUGIN names the file; else lib/ beside the binary's bin/ (a bundle, an install, the
// build tree's <build>/lib), else the loader's search (LD_LIBRARY_PATH, ld.so.cache, system
// directories). The binary's directory comes from /proc/self/exe, not from RUNPATH: dlopen
// through a sanitizer's interceptor would not see this binary's RUNPATH.
std::string plugin_path() {
  if (const char* env = std::getenv("TROUPE_CUDA_PLUGIN"); env != nullptr && *env != '\0')
    return env;
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto beside = exe.parent_path().parent_path() / "lib" / cuda::plugin_file;
    if (std::filesystem::exists(beside, ec))
      return beside.string();
  }
  return cuda::plugin_file;
}

loaded_plugin load_plugin() {
  std::string file = plugin_path();
  void* handle = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return {nullptr, fmt::format("the CUDA backend ({}) cannot be loaded: {} (it needs the CUDA 13 "
                                 "runtime, cuBLASLt 13 and NCCL 2 on the library path)",
                                 file, err != nullptr ? err : "unknown dlopen error")};
  }
  using entry_fn = const cuda::plugin_table* (*)();
  auto entry = reinterpret_cast<entry_fn>(dlsym(handle, cuda::plugin_entry_symbol));
  if (entry == nullptr)
    return {nullptr, fmt::format("{} is not troupe's CUDA backend: it has no {}", file,
                                 cuda::plugin_entry_symbol)};
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(entry), &info) != 0 && info.dli_fname != nullptr)
    file = info.dli_fname;
  const cuda::plugin_table* table = entry();
  if (table->abi_version != cuda::plugin_abi_version)
    return {nullptr, fmt::format("{} comes from another troupe build (plugin ABI {}, this binary "
                                 "needs {}): use the one shipped with this binary",
                                 file, table->abi_version, cuda::plugin_abi_version)};
  if (!(table->layout == cuda::plugin_layout{}))
    return {nullptr, fmt::format("{} comes from another troupe build (its types differ): use the "
                                 "one shipped with this binary",
                                 file)};
  return {table, {}};
}

// Loaded once, on first use, and never unloaded.
const loaded_plugin& plugin() {
  static const loaded_plugin p = load_plugin();
  return p;
}

error not_loaded() {
  return error{errc::unsupported, plugin().why};
}

} // namespace

std::string cuda_unavailable_reason() {
  const auto& p = plugin();
  return p.table != nullptr ? p.table->unavailable_reason() : p.why;
}

expected<std::unique_ptr<cuda_backend>> make_cuda_backend(const model_config& config,
                                                          const weight_source* weights,
                                                          kv_cache_options kv,
                                                          cuda_options options) {
  if (const auto* t = plugin().table)
    return t->make_backend(config, weights, kv, options);
  return not_loaded();
}

expected<std::unique_ptr<gpu_sampler>> make_gpu_sampler() {
  if (const auto* t = plugin().table)
    return t->make_sampler();
  return not_loaded();
}

expected<std::vector<cuda_device_info>> cuda_devices() {
  if (const auto* t = plugin().table)
    return t->devices();
  return not_loaded();
}

expected<void*> cuda_alloc_host(size_t bytes) {
  if (const auto* t = plugin().table)
    return t->alloc_host(bytes);
  return not_loaded();
}

void cuda_free_host(void* ptr) {
  if (const auto* t = plugin().table; t != nullptr && ptr != nullptr)
    t->free_host(ptr);
}

expected<void> cuda_copy_all(std::span<const copy_span> copies) {
  if (const auto* t = plugin().table)
    return t->copy_all(copies);
  return not_loaded();
}

expected<cuda_ipc_memory> cuda_ipc_export(const void* ptr, size_t bytes) {
  if (const auto* t = plugin().table)
    return t->ipc_export(ptr, bytes);
  return not_loaded();
}

expected<void*> cuda_ipc_open(const std::array<uint8_t, 64>& handle, int32_t device) {
  if (const auto* t = plugin().table)
    return t->ipc_open(handle, device);
  return not_loaded();
}

expected<void> cuda_ipc_close(void* base) {
  if (const auto* t = plugin().table)
    return t->ipc_close(base);
  return not_loaded();
}

namespace comm {

bool nccl_available() {
  return plugin().table != nullptr; // the plugin links NCCL
}

expected<std::unique_ptr<device_communicator>>
make_nccl_communicator(rendezvous_store& store, int rank, int size, const nccl_options& options) {
  if (const auto* t = plugin().table)
    return t->make_nccl_communicator(store, rank, size, options);
  return error{errc::unsupported, "NCCL communicator: " + plugin().why};
}

expected<std::unique_ptr<device_communicator>> make_host_staged_communicator(communicator& host) {
  if (const auto* t = plugin().table)
    return t->make_host_staged_communicator(host);
  return error{errc::unsupported, "host-staged device communicator: " + plugin().why};
}

} // namespace comm

} // namespace troupe::engine
