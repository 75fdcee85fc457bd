// Builds without CUDA: the CUDA entry points exist and say why they cannot run, so that callers
// (deployment, `cluster generate --device cuda`, GPU tests) need no #ifdef.
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/cuda_device.hpp"
#include "engine/backend/cuda/gpu_sampler.hpp"

namespace troupe::engine {

namespace {
constexpr const char* why = "troupe was built without CUDA (no nvcc, CUDA toolkit or NCCL at "
                            "configure time, or TROUPE_CUDA=OFF)";
}

std::string cuda_unavailable_reason() {
  return why;
}

expected<std::unique_ptr<cuda_backend>> make_cuda_backend(const model_config&, const weight_source*,
                                                          kv_cache_options, cuda_options) {
  return error{errc::unsupported, why};
}

expected<std::unique_ptr<gpu_sampler>> make_gpu_sampler() {
  return error{errc::unsupported, why};
}

expected<std::vector<cuda_device_info>> cuda_devices() {
  return error{errc::unsupported, why};
}

expected<void*> cuda_alloc_host(size_t) {
  return error{errc::unsupported, why};
}

void cuda_free_host(void*) {}

expected<void> cuda_copy_all(std::span<const copy_span>) {
  return error{errc::unsupported, why};
}

expected<cuda_ipc_memory> cuda_ipc_export(const void*, size_t) {
  return error{errc::unsupported, why};
}

expected<void*> cuda_ipc_open(const std::array<uint8_t, 64>&, int32_t) {
  return error{errc::unsupported, why};
}

expected<void> cuda_ipc_close(void*) {
  return error{errc::unsupported, why};
}

} // namespace troupe::engine
