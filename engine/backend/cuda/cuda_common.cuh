// Shared by the CUDA backend's translation units: checked CUDA/cuBLAS calls that turn failures
// into troupe errors, bf16 conversions, and an owning device buffer. Host code only (no kernels).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "runtime/error.hpp"

// Marks small helpers usable from kernels and host code alike (this header is also read by g++).
#ifdef __CUDACC__
#define TROUPE_HOST_DEVICE __host__ __device__
#else
#define TROUPE_HOST_DEVICE
#endif

namespace troupe::engine::cuda {

using bf16 = __nv_bfloat16;

// printf-style formatting for error messages in CUDA sources (fmt is not available to nvcc).
template <class... Ts>
std::string strf(const char* format, Ts... args) {
  int n = std::snprintf(nullptr, 0, format, args...);
  std::string out(static_cast<size_t>(n > 0 ? n : 0), '\0');
  std::snprintf(out.data(), out.size() + 1, format, args...);
  return out;
}

inline error cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  return error{errc::internal, strf("%s failed: %s (%s) at %s:%d", what, cudaGetErrorName(e),
                                    cudaGetErrorString(e), file, line)};
}
inline error cublas_error(cublasStatus_t s, const char* what, const char* file, int line) {
  return error{errc::internal,
               strf("%s failed: cuBLAS status %d at %s:%d", what, static_cast<int>(s), file, line)};
}

// Returns the failure of a CUDA runtime call as an error from the enclosing function.
#define TROUPE_CUDA(call)                                                                          \
  do {                                                                                             \
    cudaError_t troupe_e_ = (call);                                                                \
    if (troupe_e_ != cudaSuccess)                                                                  \
      return ::troupe::engine::cuda::cuda_error(troupe_e_, #call, __FILE__, __LINE__);             \
  } while (false)
// Checks the last kernel launch.
#define TROUPE_CUDA_LAUNCH() TROUPE_CUDA(cudaGetLastError())
#define TROUPE_CUBLAS(call)                                                                        \
  do {                                                                                             \
    cublasStatus_t troupe_s_ = (call);                                                             \
    if (troupe_s_ != CUBLAS_STATUS_SUCCESS)                                                        \
      return ::troupe::engine::cuda::cublas_error(troupe_s_, #call, __FILE__, __LINE__);           \
  } while (false)

// An owning device allocation (cudaMalloc); move-only.
class device_buffer {
 public:
  device_buffer() = default;
  ~device_buffer() { reset(); }
  device_buffer(device_buffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    reset();
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = o.bytes_;
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  expected<void> allocate(size_t bytes) {
    reset();
    if (bytes == 0)
      return {};
    TROUPE_CUDA(cudaMalloc(&ptr_, bytes));
    bytes_ = bytes;
    return {};
  }
  void reset() {
    if (ptr_ != nullptr)
      cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Launches `kernel` with programmatic dependent launch (Hopper): it may be scheduled while the
// kernel before it on `s` is still finishing, which hides most of the launch gap between the many
// small kernels of a decode step. Every kernel launched this way calls pdl_wait() first, so it
// reads nothing before its predecessors have completed. Graph-capturable.
template <class... Params, class... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t s, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

} // namespace troupe::engine::cuda
